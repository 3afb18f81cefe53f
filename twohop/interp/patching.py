"""Activation patching and attention knockout on two-hop questions (clean -> corrupted).

Each item is a two-hop question in two versions: the clean prompt (about e1, answer e3) and a
corrupted one, identical token for token except that e1 is swapped for another person e1' whose name
has as many tokens (so every position lines up) and whose answer e3' starts with another token.
The metric is the logit difference at the last prompt token between the first tokens of e3 and e3':
clean and corrupted runs give its two ends.

- Residual patching: run the corrupted prompt with the clean run's state at (state, position)
  written in, for every residual state (0 = embeddings, i = decoder layer i's output) and position
  kind t1 (last token of e1's mention), r (the question's other tokens, all at once) and t2 (the
  last prompt token). Recovered fraction = (patched - corrupted) / (clean - corrupted): 1 means the
  state carries everything about e1 the answer needs, 0 that it carries nothing the model still uses.
- Attention knockout: run the clean prompt with t2's attention to t1 (or to all of e1's tokens)
  cut in one decoder layer; the same fraction says how much of the clean answer survives. Where the
  corrupting e1' is known to the model as well as e1, losing all information about e1 gives about
  0.5 (no preference between e3 and e3'), not 0.

Headline fractions are ratios of means over items ((mean patched - mean corrupted) / (mean clean -
mean corrupted), as TransformerLens' normalised patching metrics), with a bootstrap standard error
over items; they mean something only where the clean - corrupted effect is clearly above zero.
"""
import random
from dataclasses import dataclass, field

import numpy as np
import torch

from twohop import stats
from twohop.evaluation import generation
from twohop.interp.hooks import Batch, final_logits, knockout, locate, n_states, patch_states, read_states

POSITIONS = ("t1", "r", "t2")


@dataclass
class Item:
    """One question, clean and corrupted: token ids, positions (the same in both), answer tokens."""
    id: str
    clean: list
    corrupted: list
    positions: dict  # e1 (token indices), t1, r (token indices), t2
    answer: int  # first token of e3 as the reply
    foil: int  # first token of e3'
    info: dict = field(default_factory=dict)  # e1, e1', e3, e3', written with every row


def first_reply_token(tokenizer, answer: str) -> int:
    return generation.reply_ids(tokenizer, [answer])[0][0]


def corrupt(tokenizer, row: dict, prompt: str, clean: tuple, other: dict, item_id: str):
    """The item for `row` (its prompt, and `clean` = locate(...) of it) corrupted with `other`'s e1, or
    None where the two prompts differ outside e1's mention or their answers start with the same token."""
    ids, positions = clean
    start = prompt.rfind(row["question"]) + row["question"].find(row["e1"])
    swapped = prompt[:start] + other["e1"] + prompt[start + len(row["e1"]):]
    question = row["question"].replace(row["e1"], other["e1"], 1)
    corrupted, corrupted_positions = locate(tokenizer, swapped, question, other["e1"])
    answer, foil = first_reply_token(tokenizer, row["answer"]), first_reply_token(tokenizer, other["answer"])
    outside = [i for i in range(len(ids)) if i not in positions["e1"]]
    if (len(corrupted) != len(ids) or corrupted_positions != positions or answer == foil
            or any(ids[i] != corrupted[i] for i in outside)):
        return None
    return Item(item_id, ids, corrupted, positions, answer, foil,
                {"e1": row["e1"], "e1_corrupt": other["e1"], "e3": row["answer"], "e3_corrupt": other["answer"]})


def no_cot_item(tokenizer, row: dict, other: dict, item_id: str):
    """`corrupt` of a two-hop no-CoT row's rendered prompt with `other`'s e1 (None where they do not pair)."""
    prompt = generation.prompt_text(tokenizer, row["messages"])
    return corrupt(tokenizer, row, prompt, locate(tokenizer, prompt, row["question"], row["e1"]), other, item_id)


def pair_items(tokenizer, groups: dict, seed: int = 0, max_items: int = 0, make=no_cot_item) -> tuple:
    """(items, skipped): each two-hop row (records with messages, question, answer, e1) paired with
    another row of its group (a test file: the same relation) for which `make(tokenizer, row, other, id)`
    gives an item (by default: e1 of the same token length, see `corrupt`), partners tried in a seeded
    order; rows with no such partner are skipped. Stops at `max_items` (0: all)."""
    rng, items, skipped = random.Random(seed), [], 0
    for name, rows in groups.items():
        for index, row in enumerate(rows):
            if max_items and len(items) == max_items:
                return items, skipped
            others = [o for o in rows if o["e1"] != row["e1"]]
            rng.shuffle(others)
            item = next((found for other in others if (found := make(tokenizer, row, other, f"{name}:{index}"))), None)
            if item is None:
                skipped += 1
            else:
                items.append(item)
    return items, skipped


def logit_difference(logits: torch.Tensor, items: list) -> list:
    """logit(e3) - logit(e3') at the last position, per item."""
    rows = torch.arange(len(items), device=logits.device)
    answers = torch.tensor([i.answer for i in items], device=logits.device)
    foils = torch.tensor([i.foil for i in items], device=logits.device)
    return (logits[rows, answers] - logits[rows, foils]).tolist()


def result_rows(items, clean, corrupted, effect, kind, layer, position) -> list:
    rows = []
    for item, c, k, e in zip(items, clean, corrupted, effect):
        recovered = (e - k) / (c - k) if c != k else None
        rows.append({"item": item.id, **item.info, "kind": kind, "layer": layer, "position": position,
                     "clean": c, "corrupted": k, "intervened": e, "recovered": recovered})
    return rows


def knockout_cells(batch: Batch, items: list, keys: str) -> tuple:
    """(rows, queries, keys) cutting t2's attention to t1 (`keys` "t1") or to every token of e1 ("e1")."""
    wanted = [i.positions["e1"] if keys == "e1" else [i.positions["t1"]] for i in items]
    rows, key_columns = batch.cells(wanted)
    _, query_columns = batch.cells([[i.positions["t2"]] * len(w) for i, w in zip(items, wanted)])
    return rows, query_columns, key_columns


@torch.no_grad()
def patch_chunk(model, items: list, pad_id: int, positions=POSITIONS, knockout_to: str = "t1") -> list:
    """Every patching and knockout row of a few items run together (one batch per intervention)."""
    device = next(model.parameters()).device
    clean = Batch.left_padded([i.clean for i in items], pad_id, device)
    corrupted = Batch.left_padded([i.corrupted for i in items], pad_id, device)  # same lengths: same cells
    with read_states(model) as states:
        clean_diff = logit_difference(final_logits(model, clean), items)
    corrupted_diff = logit_difference(final_logits(model, corrupted), items)
    rows = []
    for state in range(n_states(model)):
        for position in positions:
            cells = clean.cells([i.positions[position] for i in items])
            with patch_states(model, {state: (*cells, states[state][cells])}, corrupted):
                patched = logit_difference(final_logits(model, corrupted), items)
            rows += result_rows(items, clean_diff, corrupted_diff, patched, "patch", state, position)
    for layer in range(1, n_states(model)):
        with knockout(model, layer, knockout_cells(clean, items, knockout_to), clean):
            knocked = logit_difference(final_logits(model, clean), items)
        rows += result_rows(items, clean_diff, corrupted_diff, knocked, "knockout", layer, f"t2->{knockout_to}")
    return rows


def recovered(rows: list, samples: int = 1000, seed: int = 0) -> dict:
    """{recovered, se, n} of one (kind, layer, position): the ratio of means over items, with a
    bootstrap standard error over items (None where the clean and corrupted means are equal)."""
    values = np.array([[r["clean"], r["corrupted"], r["intervened"]] for r in rows])

    def ratio(v):
        effect = v[..., 0].mean(-1) - v[..., 1].mean(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return (v[..., 2].mean(-1) - v[..., 1].mean(-1)) / effect

    point = float(ratio(values))
    draws = ratio(values[np.random.default_rng(seed).integers(0, len(values), (samples, len(values)))])
    se = float(np.nanstd(draws)) if np.isfinite(point) and len(values) > 1 else None
    return {"recovered": point if np.isfinite(point) else None, "se": se, "n": len(values)}


def summarise(rows: list, samples: int = 1000) -> dict:
    """The headline of a sweep: the clean - corrupted effect (mean and s.e. over items), and the
    recovered fraction of every (layer, position) of the patching grid and of every knockout layer."""
    groups = {}
    for row in rows:
        groups.setdefault((row["kind"], row["position"], row["layer"]), []).append(row)
    effects = {row["item"]: row["clean"] - row["corrupted"] for row in rows}
    mean, se = stats.mean_se(list(effects.values()))
    out = {"n": len(effects), "effect": {"mean": mean, "se": se}, "patch": {}, "knockout": {}}
    order = {position: i for i, position in enumerate(POSITIONS)}
    for (kind, position, layer), members in sorted(groups.items(), key=lambda g: (order.get(g[0][1], 9), g[0])):
        out[kind].setdefault(position, []).append({"layer": layer, **recovered(members, samples)})
    return out


def sweep(model, items: list, pad_id: int, batch_size: int, knockout_to: str = "t1", progress=None) -> list:
    """Every row of the patching grid and the knockout curve, `batch_size` items at a time (items of
    one length together, so little padding is run)."""
    ordered = sorted(items, key=lambda item: len(item.clean))
    rows = []
    for start in range(0, len(ordered), batch_size):
        rows += patch_chunk(model, ordered[start:start + batch_size], pad_id, knockout_to=knockout_to)
        if progress:
            progress(min(start + batch_size, len(ordered)), len(ordered))
    return rows
