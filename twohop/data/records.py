"""Dataset records (JSONL), compatible with the reference repo's files.

A record is `{"messages": [...], "question", "answer", "answer_intermediate",
"auxiliary_loss_prefix", ...extra}`: `answer` is e3 (or e2 for a first-hop question),
`answer_intermediate` the bridge entity ("" for atomic facts), `auxiliary_loss_prefix` the question
up to the relation words (two-hop no-CoT rows). Test rows carry the gold assistant turn.
"""
import json
from pathlib import Path

from runner.errors import UserError

REQUIRED_FIELDS = ("messages", "answer")


def chat(system: str, user: str, assistant: str) -> list:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def record(question: str, answer: str, reply: str, system: str = "", answer_intermediate: str = "",
           auxiliary_loss_prefix: str = "", **extra) -> dict:
    """One row: the chat (with the gold reply) plus the reference fields and our extras."""
    return {"messages": chat(system, question, reply), "question": question, "answer": answer,
            "answer_intermediate": answer_intermediate, "auxiliary_loss_prefix": auxiliary_loss_prefix,
            **extra}


def read_records(path, required=REQUIRED_FIELDS) -> list:
    """Read a JSONL file of records; any bad line is one UserError naming file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"dataset file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: expected a JSON object per line")
            for field in required:
                if field not in row:
                    raise UserError(f"{path}:{number}: missing field {field!r} (needed: {', '.join(required)})")
            messages = row.get("messages")
            if "messages" in required and (not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
                raise UserError(f"{path}:{number}: field 'messages' must be a list of {{role, content}} objects")
            rows.append(row)
    if not rows:
        raise UserError(f"dataset file {path} is empty")
    return rows
