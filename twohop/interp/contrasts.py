"""Clean/corrupted prompt pairs for circuit discovery (`twohop.interp.circuits`), as `patching.Item`s.

- Two-hop no-CoT: `patching.pair_items` as is (e1 swapped for another person's e1 of the same token
  length; answer e3 against the other person's e3).
- Two-hop CoT (`chain_item`): the CoT prompt plus the gold chain up to the bridge's first mention
  ("... Ulla Ravenscroft-Szymanski's spouse is"), so the next token is the start of the bridge e2: the
  chain's first hop. The corrupted text swaps e1 everywhere after the question starts (in the question
  and in the chain) for the partner's e1; the foil is the start of the partner's e2.
- In-context two-hop (`in_context_items`): the facts are in the prompt; the corrupted prompt asks the final
  question about another person of the prompt's facts (a distractor whose spouse's birthplace is listed and
  whose name has as many tokens); the foil is that person's answer. The tiny base model's own task.
- IOI (`ioi_items`): a `generate_data_ioi` row and its `corrupted_prompt` (the answer's and the foil's
  names swapped), rendered with the model's chat template where it has one (the answer as the reply's
  first token), else as raw text after BOS (the answer as " " + name).
"""
import re

from twohop.evaluation import generation
from twohop.interp.patching import Item, first_reply_token
from runner.errors import UserError


def _ids(tokenizer, text: str) -> list:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def next_token(tokenizer, text: str, ids: list, continuation: str):
    """The first token of `continuation` written after `text` (whose tokens are `ids`), or None where
    the two merge across the boundary (the text's own tokens change)."""
    joined = _ids(tokenizer, text + continuation)
    return joined[len(ids)] if joined[:len(ids)] == ids and len(joined) > len(ids) else None


def chain_item(tokenizer, row: dict, other: dict, item_id: str):
    """The CoT item for `row` corrupted with `other`'s e1 (None where the two texts differ in length or
    the bridges start with the same token)."""
    chain = row["messages"][-1]["content"]
    cut = chain.find(row["e2"])
    if row["messages"][-1]["role"] != "assistant" or cut < 0:
        raise UserError(f"CoT row {item_id}: its gold reply does not mention the bridge {row['e2']!r}")
    prompt = generation.prompt_text(tokenizer, row["messages"])
    prefix = chain[:cut].rstrip()
    text, gap = prompt + prefix, chain[len(prefix):cut]
    start = prompt.rfind(row["question"])
    swapped = text[:start] + text[start:].replace(row["e1"], other["e1"])
    ids, corrupted = _ids(tokenizer, text), _ids(tokenizer, swapped)
    answer = next_token(tokenizer, text, ids, gap + row["e2"])
    foil = next_token(tokenizer, swapped, corrupted, gap + other["e2"])
    if len(ids) != len(corrupted) or answer is None or foil is None or answer == foil:
        return None
    return Item(item_id, ids, corrupted, {}, answer, foil,
                {"e1": row["e1"], "e1_corrupt": other["e1"], "e2": row["e2"], "e2_corrupt": other["e2"]})


def ioi_items(tokenizer, rows: list, max_items: int = 0) -> tuple:
    """(items, skipped) of IOI rows; a row whose two rendered prompts differ in length is skipped."""
    items, skipped = [], 0
    for index, row in enumerate(rows):
        if max_items and len(items) == max_items:
            break
        if tokenizer.chat_template:
            corrupted_messages = [{**m, "content": row["corrupted_prompt"]} if m["role"] == "user" else m
                                  for m in row["messages"]]
            texts = [generation.prompt_text(tokenizer, m) for m in (row["messages"], corrupted_messages)]
            answer, foil = (first_reply_token(tokenizer, row[key]) for key in ("answer", "corrupted_answer"))
        else:
            texts = [(tokenizer.bos_token or "") + row[key] for key in ("prompt", "corrupted_prompt")]
            answer, foil = (_ids(tokenizer, " " + row[key])[0] for key in ("answer", "corrupted_answer"))
        clean, corrupted = (_ids(tokenizer, text) for text in texts)
        if len(clean) != len(corrupted) or answer == foil:
            skipped += 1
            continue
        items.append(Item(f"{row.get('family', 'ioi')}:{index}", clean, corrupted, {}, answer, foil,
                          {"answer": row["answer"], "foil": row["corrupted_answer"]}))
    return items, skipped


SPOUSE_FACT = re.compile(r"^(.+)'s spouse is (.+)\.$")
BIRTH_FACT = re.compile(r"^(.+) was born in (.+)\.$")


def _facts(question: str, pattern) -> dict:
    return dict(m.groups() for line in question.split("\n") if (m := pattern.match(line.strip())))


def in_context_item(tokenizer, row: dict, item_id: str):
    """The item of an in-context row: e1 in its last line (the question) swapped for a distractor person of
    its facts (None where no distractor has a name as long and an answer starting with another token)."""
    prompt = generation.prompt_text(tokenizer, row["messages"])
    asked = prompt.rfind(row["question"]) + row["question"].rfind("\n") + 1
    start = prompt.find(row["e1"], asked)
    if start < 0:
        raise UserError(f"in-context row {item_id}: e1 {row['e1']!r} is not in the prompt's last line")
    spouses, births = _facts(row["question"], SPOUSE_FACT), _facts(row["question"], BIRTH_FACT)
    ids, answer = _ids(tokenizer, prompt), first_reply_token(tokenizer, row["answer"])
    for person, spouse in sorted(spouses.items()):
        if person == row["e1"] or spouse not in births:
            continue
        corrupted = _ids(tokenizer, prompt[:start] + person + prompt[start + len(row["e1"]):])
        foil = first_reply_token(tokenizer, births[spouse])
        if len(corrupted) == len(ids) and foil != answer:
            return Item(item_id, ids, corrupted, {}, answer, foil,
                        {"e1": row["e1"], "e1_corrupt": person, "e3": row["answer"], "e3_corrupt": births[spouse]})
    return None


def in_context_items(tokenizer, groups: dict, max_items: int = 0) -> tuple:
    """(items, skipped) of in-context rows ({test: rows}); rows without a usable distractor are skipped."""
    items, skipped = [], 0
    for name, rows in groups.items():
        for index, row in enumerate(rows):
            if max_items and len(items) == max_items:
                return items, skipped
            item = in_context_item(tokenizer, row, f"{name}:{index}")
            skipped += item is None
            items += [item] if item else []
    return items, skipped
