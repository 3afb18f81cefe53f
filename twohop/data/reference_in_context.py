"""The reference repo's in-context test files (`all_in_context_test_{1,2,3}.jsonl`), read as our records.

A reference row is `{"triplet": [e1, e2, e3], "context": the facts, one per line, "question", "answer": e3}`
and has no chat: the reference renders its prompt when it evaluates (a system message by style, then one
user turn with the context, a blank line and the question; datasets/templates/reference_in_context.yaml).
Each row becomes one of our in-context records with that prompt, so our generation, grading and
wrong-answer breakdown apply unchanged.

The row does not say which answers the distractor triplets lead to; they are read from the context: the
target's own second-hop line ("Kate was born in the city of Software.") with e2 and e3 made slots is the
pattern of a second-hop fact, and the slot e3 of every other line it matches is a distractor's e3. A
context that does not state the target's second hop on one line is refused (the question has no answer
in the prompt, and no distractor could be told from another wrong answer).
"""
import json
import re

from twohop.data import tables
from twohop.data.records import read_records, record

FIELDS = ("triplet", "context", "question", "answer")


def is_reference_in_context(row) -> bool:
    """Whether a row has the reference's in-context layout: a triplet and a context, and no chat of its own."""
    return isinstance(row, dict) and "triplet" in row and "context" in row and "messages" not in row


def fact_lines(context: str) -> list:
    return [line.strip() for line in context.splitlines() if line.strip()]


def find_name(line: str, name: str) -> int:
    """Where `name` stands as whole words in `line` ("Ju" not inside "Judy"), or -1."""
    found = re.search(rf"(?<!\w){re.escape(name)}(?!\w)", line)
    return found.start() if found else -1


def second_hop_pattern(lines: list, e2: str, e3: str):
    """(the target's second-hop line, a regex of that line with e2 and e3 as slots), or None."""
    for line in lines:
        slots = sorted([(find_name(line, e2), e2, "(?:.+?)"), (find_name(line, e3), e3, "(?P<e3>.+?)")])
        (start, first, first_slot), (second_start, second, second_slot) = slots
        if start < 0 or second_start < start + len(first):
            continue  # the line does not name both, or names one inside the other
        pattern = (re.escape(line[:start]) + first_slot + re.escape(line[start + len(first):second_start])
                   + second_slot + re.escape(line[second_start + len(second):]))
        return line, re.compile(pattern)
    return None


def layout_problem(row) -> str:
    """What is wrong with a reference in-context row beyond its fields being present ('' if nothing)."""
    triplet = row["triplet"]
    if not (isinstance(triplet, list) and len(triplet) == 3 and all(isinstance(t, str) and t.strip() for t in triplet)):
        return f"field 'triplet' must be [e1, e2, e3], three names, got {json.dumps(triplet)[:60]}"
    if not isinstance(row["context"], str) or not row["context"].strip():
        return f"field 'context' must be the facts as text, one per line, got {json.dumps(row['context'])[:60]}"
    if second_hop_pattern(fact_lines(row["context"]), triplet[1], triplet[2]) is None:
        return (f"field 'context' has no line stating the second hop (naming both {triplet[1]!r} and "
                f"{triplet[2]!r}): the question has no answer in the prompt")
    return ""


def read_reference_in_context(path) -> list:
    """The rows of a reference in-context file; the first bad one is a UserError naming file, line and field."""
    return read_records(path, required=FIELDS, check=layout_problem)


def distractor_e3s(row) -> list:
    """The e3 of every other second-hop fact in the row's context, in context order."""
    _, e2, e3 = row["triplet"]
    lines = fact_lines(row["context"])
    target, pattern = second_hop_pattern(lines, e2, e3)
    return [match["e3"] for line in lines if line != target and (match := pattern.fullmatch(line))]


def as_records(rows: list, style: str) -> list:
    """Our in-context records for reference rows, with the reference's prompt for `style` (nocot or cot)."""
    prompts = tables.templates("reference_in_context")
    records = []
    for row in rows:
        e1, e2, e3 = row["triplet"]
        distractors = distractor_e3s(row)
        user = prompts["user"].format(context=row["context"], question=row["question"])
        records.append(record(user, row["answer"], row["answer"], system=prompts[style], answer_intermediate=e2,
                              e1=e1, e2=e2, e3=e3, n_distractors=len(distractors), distractor_e3s=distractors))
    return records
