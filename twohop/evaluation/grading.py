"""Answer grading, shared by our evaluator and the lm-eval tasks we export.

Matching normalises case, accents, punctuation and whitespace and then matches whole words (or
an alias), so "Oslo" is found in "It was Oslo." but "Nice" is not found in "Venice". An answer
counts only where it is stated, not inside a mention of the bridge entity, of e1 or of another entity
the bridge could have been (a row's `bridge_candidates`): "University of Texas" does not state "Texas",
"Massachusetts Institute of Technology" does not state "Massachusetts", "It is in Texas." does. Each
grade says which rule decided it. This module uses the standard library only: the lm-eval export
copies this file next to the task YAMLs (as the `!function` hook), so `lm_eval --include_path` grades
exactly as we do.
"""
import re
import unicodedata

ANSWER_MARKER = re.compile(r"answer is", re.IGNORECASE)


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def split_aliases(value) -> tuple:
    """(the name, its other spellings) of an answer or bridge given as text or, as older reference files
    give them, as a list of aliases (the first is the name); an empty or missing one is ("", ())."""
    if isinstance(value, (list, tuple)):
        return (value[0], tuple(value[1:])) if value else ("", ())
    return value or "", ()


def mentions(text: str, answer: str, aliases=()) -> bool:
    """Whole-word match of the answer or any alias in the text, after normalisation."""
    haystack = f" {normalize(text)} "
    return any(f" {normalize(a)} " in haystack for a in (answer, *aliases) if normalize(a))


# Words that may join an answer to a name without making it part of that name ("the state of Texas").
LINKING_WORDS = {"of", "the", "a", "an", "in", "at", "on", "de", "la", "le", "du", "and", "for", "to"}


def _occurrences(words: list, target: list) -> list:
    return [i for i in range(len(words) - len(target) + 1) if target and words[i:i + len(target)] == target]


def inside_name(words: list, start: int, length: int, name: list) -> bool:
    """Whether words[start:start+length] is part of a longer mention of `name` (e.g. "Texas" in
    "University of Texas"): the text around it continues the name by at least one content word."""
    target = words[start:start + length]
    for j in _occurrences(name, target):
        before = 0
        while start - before > 0 and j - before > 0 and words[start - before - 1] == name[j - before - 1]:
            before += 1
        after = 0
        while (start + length + after < len(words) and j + length + after < len(name)
               and words[start + length + after] == name[j + length + after]):
            after += 1
        extension = words[start - before:start] + words[start + length:start + length + after]
        if any(word not in LINKING_WORDS for word in extension):
            return True
    return False


def answer_positions(text: str, answer: str, aliases=(), names=()) -> tuple:
    """(word positions where the answer or an alias is stated, positions where it only occurs inside a
    mention of one of `names`, e.g. the bridge entity or e1)."""
    words = normalize(text).split()
    name_words = [normalize(n).split() for n in names if n and normalize(n) != normalize(answer)]
    stated, inside = [], []
    for target in {normalize(a) for a in (answer, *aliases) if normalize(a)}:
        length = len(target.split())
        for i in _occurrences(words, target.split()):
            (inside if any(inside_name(words, i, length, n) for n in name_words) else stated).append(i)
    return sorted(stated), sorted(inside)


def mention_position(text: str, answer: str, names=()):
    """Word position (in the normalised text) of the first whole-word mention stated outside `names`, or None."""
    stated, _ = answer_positions(text, answer, (), names)
    return stated[0] if stated else None


def answer_rule(text: str, answer: str, aliases, names, others=(), bridge_named: bool = False) -> str:
    """Which rule decides a reply: the answer stated; the answer only inside one of `names` (the bridge's,
    e1's); only inside another entity the bridge could have been (`others`: a wrong first hop); the bridge
    named without the answer; neither."""
    stated, inside = answer_positions(text, answer, aliases, [*names, *others])
    if stated:
        return "answer_stated"
    if inside:
        stated_but_for_others = others and answer_positions(text, answer, aliases, names)[0]
        return "answer_inside_other_entity" if stated_but_for_others else "answer_inside_name"
    return "bridge_only" if bridge_named else "no_answer"


def split_cot(generation: str) -> tuple:
    """(the chain, the final answer) of a chain-of-thought reply; the final part follows 'answer is'."""
    matches = list(ANSWER_MARKER.finditer(generation))
    if not matches:
        return generation, generation
    return generation[:matches[-1].start()], generation[matches[-1].end():]


def chain_answer(chain: str, candidates, names=()) -> str:
    """The candidate the chain states last (e.g. the city in '... Y was born in Z.'), or ''; a candidate
    inside another's mention is not stated ("Red" in "Cardinal Red")."""
    words = set(normalize(chain).split())
    # Only a name sharing a word with the chain can hold a mention; the rest would cost a scan each.
    covering = [n for n in (*names, *candidates) if words.intersection(normalize(n).split())]
    found = [(mention_position(chain, c, covering), c) for c in candidates]
    found = [(p, c) for p, c in found if p is not None]
    return max(found)[1] if found else ""


def grade(row: dict, generation: str, style: str, candidates=(), aliases=()) -> dict:
    """Per-example grades: correct, strict (no bridge written), first_hop, valid_cot, and `rule`; the
    bridge's grades (strict, first_hop, valid_cot) are None, not applicable, where the row names none.
    `answer` and `answer_intermediate` may be lists of aliases; a row's `bridge_candidates` are the
    entities its bridge is one of (a semi-synthetic type's: every university).

    An answer counts only where it is stated, not where it occurs inside a mention of the bridge
    entity or of e1 ("University of Texas" does not answer "Texas": `rule` answer_inside_name, a
    first-hop outcome like bridge_only) or of one of the row's `bridge_candidates` (naming the London
    Symphony does not answer "London": answer_inside_other_entity, a wrong first hop); never correct."""
    answer, more = split_aliases(row["answer"])
    bridge, bridge_aliases = split_aliases(row.get("answer_intermediate"))
    aliases = (*more, *aliases)
    names = [n for n in (bridge, *bridge_aliases, row.get("e1", "")) if isinstance(n, str) and n]
    # A hop B row has no bridge: its subject (e2) is the entity asked about, not a wrong first hop.
    others = [n for n in row.get("bridge_candidates") or () if n not in names and n != row.get("e2")]

    def names_bridge(text: str) -> bool:  # not inside another candidate's name ("Xbox" in "Xbox 360")
        return bool(bridge) and bool(answer_positions(text, bridge, bridge_aliases, others)[0])
    # Without a bridge (atomic facts, the reference's semi-synthetic tests) the first-hop grades do not apply.
    first_hop = names_bridge(generation) if bridge else None
    if style == "cot":
        chain, final = split_cot(generation)
        stated = chain_answer(chain, candidates, [*names, *others]) if candidates else ""
        rule = answer_rule(final, answer, aliases, names, others, names_bridge(final))
        answer_at = mention_position(generation, answer, [*names, *others])
        bridge_at = mention_position(generation, bridge, others)
        valid = (bridge_at is not None and answer_at is not None and bridge_at < answer_at) if bridge else None
        return {"correct": rule == "answer_stated", "chain_correct": stated == answer, "first_hop": first_hop,
                "valid_cot": valid, "rule": rule}
    rule = answer_rule(generation, answer, aliases, names, others, bool(first_hop))
    correct = rule == "answer_stated"
    return {"correct": correct, "strict": correct and not first_hop if bridge else None, "first_hop": first_hop,
            "rule": rule}


def process_results(doc: dict, results: list) -> dict:
    """lm-eval hook: grade one generation of an exported task (the doc carries style and candidates)."""
    grades = grade(doc, results[0].strip(), doc["style"], doc.get("candidates", ()), doc.get("aliases", ()))
    return {key: float(value) for key, value in grades.items() if isinstance(value, bool)}  # n/a grades left out
