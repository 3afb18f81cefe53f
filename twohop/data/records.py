"""Dataset records (JSONL), compatible with the reference repo's files.

A record is `{"messages": [...], "question", "answer", "answer_intermediate",
"auxiliary_loss_prefix", ...extra}`: `answer` is e3 (or e2 for a first-hop question),
`answer_intermediate` the bridge entity ("" for atomic facts; both may be lists of aliases, as in older
reference files), `auxiliary_loss_prefix` the question
up to the relation words (two-hop no-CoT rows). Test rows carry the gold assistant turn.
"""
import json
from pathlib import Path

from runner.errors import UserError
from runner.files import read_text

REQUIRED_FIELDS = ("messages", "answer")
TEXT_FIELDS = ("question", "auxiliary_loss_prefix")
# Older reference files list an answer's (or bridge's) aliases instead of giving one text.
ALIAS_FIELDS = ("answer", "answer_intermediate")


def chat(system: str, user: str, assistant: str) -> list:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def record(question: str, answer: str, reply: str, system: str = "", answer_intermediate: str = "",
           auxiliary_loss_prefix: str = "", **extra) -> dict:
    """One row: the chat (with the gold reply) plus the reference fields and our extras."""
    return {"messages": chat(system, question, reply), "question": question, "answer": answer,
            "answer_intermediate": answer_intermediate, "auxiliary_loss_prefix": auxiliary_loss_prefix,
            **extra}


def chat_problem(messages) -> str:
    """What is wrong with a chat (a list of {role, content} objects with text), or ''."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return "field 'messages' must be a non-empty list of {role, content} objects"
    for i, message in enumerate(messages):
        if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            return f"messages[{i}] needs a text 'role' and 'content', got {json.dumps(message)[:80]}"
    return ""


def row_problem(row, required) -> str:
    """What is wrong with one record: a missing required field, a chat that is not one, or a text field
    (question, answer, ...), `aliases` or `bridge_candidates` of the wrong type; '' if nothing."""
    if not isinstance(row, dict):
        return "expected a JSON object per line"
    for field in required:
        if field not in row:
            return f"missing field {field!r} (needed: {', '.join(required)})"
    chat = chat_problem(row["messages"]) if "messages" in required else ""
    if chat:
        return chat
    for field in TEXT_FIELDS:
        if field in row and not isinstance(row[field], str):
            return f"field {field!r} must be text, got {json.dumps(row[field])[:60]}"
    for field in ALIAS_FIELDS:
        if field in row and not (isinstance(row[field], str) or (isinstance(row[field], list) and row[field] and all(
                isinstance(a, str) for a in row[field]))):
            return f"field {field!r} must be text or a non-empty list of texts, got {json.dumps(row[field])[:60]}"
    for field in ("aliases", "bridge_candidates"):
        if field in row and not (isinstance(row[field], list) and all(isinstance(a, str) for a in row[field])):
            return f"field {field!r} must be a list of texts, got {json.dumps(row[field])[:60]}"
    return ""


def prompt_problem(row) -> str:
    """What is wrong with a prompts-file row: it needs a chat in 'messages' or raw text in 'prompt'."""
    if "messages" in row:
        return chat_problem(row["messages"])
    if "prompt" in row:
        prompt = row["prompt"]
        return "" if isinstance(prompt, str) else f"field 'prompt' must be text, got {json.dumps(prompt)[:60]}"
    return "needs 'messages' (a chat) or 'prompt' (raw text)"


def read_records(path, required=REQUIRED_FIELDS, check=None) -> list:
    """Read a JSONL file of records; the first bad line is one UserError naming file, line and field.
    `check(row)` returns what else is wrong with a row ('' if nothing)."""
    path = Path(path)
    rows = []
    for number, line in enumerate(read_text(path, "dataset file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        problem = row_problem(row, required) or (check(row) if check else "")
        if problem:
            raise UserError(f"{path}:{number}: {problem}")
        rows.append(row)
    if not rows:
        raise UserError(f"dataset file {path} is empty")
    return rows


def read_prompts(path) -> list:
    """A prompts file: JSONL rows with 'messages' (a chat) or 'prompt' (raw text), any other fields kept."""
    return read_records(path, required=(), check=prompt_problem)
