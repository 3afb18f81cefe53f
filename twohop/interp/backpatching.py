"""Back-patching (Hopping Too Late, Biran et al., EMNLP 2024): give an earlier layer what a later
layer of the same prompt computed, and see whether the model now answers.

For a two-hop question and a pair of residual states source > target (0 = embeddings, i = decoder
layer i's output), the prompt pass runs with the state at `target` replaced, at t2 (the last prompt
token; or t1, the last token of e1), by the same prompt's unpatched state at `source`; generation
then continues greedily from the patched prompt (the decoding steps are not patched) and the reply
is graded by `twohop.evaluation.grading`. Every state at t1 and t2 comes from one clean pass per
question, cached, so a pair costs one patched generation and no extra clean pass.

Headlines, over the questions answered wrongly without patching: the oracle fix rate (the share
fixed by at least one pair, each question choosing its own: an upper bound, as in the paper's 66%)
and the best single pair's fix rate (one pair for every question: the honest number); over the
questions answered rightly: the share each pair preserves.
"""
from dataclasses import dataclass

import torch

from twohop import stats
from twohop.evaluation import generation
from twohop.evaluation.grading import grade
from twohop.interp.hooks import Batch, final_logits, locate, patch_states, read_states

PATCH_POSITIONS = ("t2", "t1")


@dataclass
class Query:
    id: str
    ids: list
    positions: dict
    record: dict  # the dataset row: answer, answer_intermediate, e1, aliases (for grading)


def queries(tokenizer, tests: dict, max_items: int = 0) -> list:
    """Every two-hop row of `tests` ({name: rows}) as a Query, at most `max_items` (0: all)."""
    out = []
    for name, rows in tests.items():
        for index, row in enumerate(rows):
            ids, positions = locate(tokenizer, generation.prompt_text(tokenizer, row["messages"]), row["question"],
                                    row["e1"])
            out.append(Query(f"{name}:{index}", ids, positions, row))
    return out[:max_items] if max_items else out


def layer_pairs(states: int, stride: int = 1) -> list:
    """(source, target) with source > target over every `stride`-th state (the last one always kept)."""
    kept = sorted(set(range(0, states, stride)) | {states - 1})
    return [(source, target) for target in kept for source in kept if source > target]


@torch.no_grad()
def clean_states(model, batch: Batch, queries_: list) -> dict:
    """{position: [queries, states, hidden]}: every state of one clean pass at t1 and t2."""
    with read_states(model) as states:
        final_logits(model, batch)
    out = {}
    for position in PATCH_POSITIONS:
        rows, columns = batch.cells([q.positions[position] for q in queries_])
        out[position] = torch.stack([states[s][rows, columns] for s in sorted(states)], dim=1)
    return out


@torch.no_grad()
def patched_replies(model, tokenizer, jobs: list, cache: dict, max_new_tokens: int) -> list:
    """Greedy replies for `jobs` = [(query, index into `cache`, position, source, target)], source None
    for the unpatched reply; each row's prompt pass gets its own patch."""
    device = next(model.parameters()).device
    batch = Batch.left_padded([job[0].ids for job in jobs], tokenizer.pad_token_id, device)
    edits = {}
    for row, (query, index, position, source, target) in enumerate(jobs):
        if source is not None:
            rows, columns, values = edits.setdefault(target, ([], [], []))
            rows.append(row)
            columns.append(batch.padding[row] + query.positions[position])
            values.append(cache[position][index, source])
    edits = {target: (torch.tensor(r, device=device), torch.tensor(c, device=device), torch.stack(v))
             for target, (r, c, v) in edits.items()}
    with patch_states(model, edits, batch):
        tokens = generation.greedy(model, tokenizer, batch.input_ids, batch.attention_mask, max_new_tokens)
    return [text.strip() for text in tokenizer.batch_decode(tokens, skip_special_tokens=True)]


def job_row(job: tuple, reply: str) -> dict:
    query, _, position, source, target = job
    grades = grade(query.record, reply, "nocot", aliases=query.record.get("aliases", ()))
    return {"item": query.id, "e1": query.record["e1"], "e2": query.record.get("answer_intermediate", ""),
            "e3": query.record["answer"], "position": position,
            "source": source, "target": target, "reply": reply, "correct": grades["correct"], "rule": grades["rule"]}


def grid_rows(model, tokenizer, queries_: list, pairs: list, positions, batch_size: int, max_new_tokens: int,
              done=frozenset()):
    """Yield the rows of the grid (the unpatched reply, then every pair at every position) a chunk of
    questions at a time, skipping (item, position, source, target) keys in `done`."""
    device = next(model.parameters()).device
    for start in range(0, len(queries_), batch_size):
        chunk = queries_[start:start + batch_size]
        todo = [(q, i, p, s, t) for i, q in enumerate(chunk)
                for p, s, t in [("none", None, None)] + [(p, s, t) for p in positions for s, t in pairs]
                if (q.id, p, s, t) not in done]
        if not todo:
            continue
        cache = clean_states(model, Batch.left_padded([q.ids for q in chunk], tokenizer.pad_token_id, device), chunk)
        for first in range(0, len(todo), batch_size):
            jobs = todo[first:first + batch_size]
            yield [job_row(job, reply) for job, reply in
                   zip(jobs, patched_replies(model, tokenizer, jobs, cache, max_new_tokens))]


def row_key(row: dict) -> tuple:
    return row["item"], row["position"], row["source"], row["target"]


def _rate(hits: int, n: int) -> dict:
    return {"rate": hits / n if n else None, "se": stats.binomial_se(hits / n, n) if n else None, "n": n}


def summarise(rows: list) -> dict:
    """Accuracy unpatched; per (position, source, target) the fix and preservation rates; the oracle
    fix rate (per position and over both) and the best single pair (most fixes, then most preserved)."""
    baseline = {r["item"]: r["correct"] for r in rows if r["position"] == "none"}
    wrong = [item for item, correct in baseline.items() if not correct]
    right = [item for item, correct in baseline.items() if correct]
    by_pair = {}
    for r in rows:
        if r["position"] != "none":
            by_pair.setdefault((r["position"], r["source"], r["target"]), {})[r["item"]] = r["correct"]
    pairs = [{"position": p, "source": s, "target": t, "fix": _rate(sum(got.get(i, False) for i in wrong), len(wrong)),
              "preserve": _rate(sum(got.get(i, False) for i in right), len(right))}
             for (p, s, t), got in sorted(by_pair.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1]))]
    oracle = {}
    for position in sorted({p for p, _, _ in by_pair}) + ["any"]:
        chosen = [got for (p, _, _), got in by_pair.items() if position in (p, "any")]
        oracle[position] = _rate(sum(any(got.get(i, False) for got in chosen) for i in wrong), len(wrong))
    best = max(pairs, key=lambda e: (e["fix"]["rate"] or 0, e["preserve"]["rate"] or 0), default=None)
    return {"n": len(baseline), "accuracy": _rate(len(right), len(baseline)), "wrong": len(wrong),
            "right": len(right), "oracle_fix": oracle, "best_pair": best, "pairs": pairs}
