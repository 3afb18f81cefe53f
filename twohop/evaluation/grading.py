"""Answer grading, shared by our evaluator and the lm-eval tasks we export.

Matching normalises case, accents, punctuation and whitespace and then matches whole words (or
an alias), so "Oslo" is found in "It was Oslo." but "Nice" is not found in "Venice".
This module uses the standard library only: the lm-eval export copies this file next to the task
YAMLs (as the `!function` hook), so `lm_eval --include_path` grades exactly as we do.
"""
import re
import unicodedata

ANSWER_MARKER = re.compile(r"answer is", re.IGNORECASE)


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def mentions(text: str, answer: str, aliases=()) -> bool:
    """Whole-word match of the answer or any alias in the text, after normalisation."""
    haystack = f" {normalize(text)} "
    return any(f" {normalize(a)} " in haystack for a in (answer, *aliases) if normalize(a))


def mention_position(text: str, answer: str):
    """Character position (in the normalised text) of the first whole-word mention, or None."""
    haystack = f" {normalize(text)} "
    index = haystack.find(f" {normalize(answer)} ")
    return None if index < 0 else index


def split_cot(generation: str) -> tuple:
    """(the chain, the final answer) of a chain-of-thought reply; the final part follows 'answer is'."""
    matches = list(ANSWER_MARKER.finditer(generation))
    if not matches:
        return generation, generation
    return generation[:matches[-1].start()], generation[matches[-1].end():]


def chain_answer(chain: str, candidates) -> str:
    """The candidate the chain states last (e.g. the city in '... Y was born in Z.'), or ''."""
    found = [(mention_position(chain, c), c) for c in candidates]
    found = [(p, c) for p, c in found if p is not None]
    return max(found)[1] if found else ""


def grade(row: dict, generation: str, style: str, candidates=(), aliases=()) -> dict:
    """Per-example grades: correct, strict (no bridge written), first_hop, valid_cot."""
    answer, bridge = row["answer"], row.get("answer_intermediate", "")
    if style == "cot":
        chain, final = split_cot(generation)
        stated = chain_answer(chain, candidates) if candidates else ""
        correct = mentions(final, answer, aliases)
        answer_at, bridge_at = mention_position(generation, answer), mention_position(generation, bridge) if bridge else None
        return {"correct": correct, "chain_correct": stated == answer,
                "first_hop": bool(bridge) and mentions(generation, bridge),
                "valid_cot": bridge_at is not None and answer_at is not None and bridge_at < answer_at}
    correct = mentions(generation, answer, aliases)
    first_hop = bool(bridge) and mentions(generation, bridge)
    return {"correct": correct, "strict": correct and not first_hop, "first_hop": first_hop}


def process_results(doc: dict, results: list) -> dict:
    """lm-eval hook: grade one generation of an exported task (the doc carries style and candidates)."""
    grades = grade(doc, results[0].strip(), doc["style"], doc.get("candidates", ()), doc.get("aliases", ()))
    return {key: float(value) for key, value in grades.items()}
