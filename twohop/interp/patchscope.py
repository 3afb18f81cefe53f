"""Patchscopes (Ghandeharioun et al., 2024) on two-hop questions: what entity does a hidden state name?

A residual state of the two-hop prompt at position t1 (the last token of e1's mention) or t2 (the
last prompt token) and source state s (0 = embeddings, i = decoder layer i's output) is written into
the placeholder token "x" of a description prompt at a target state (`target_state`: the same state
s, as the Patchscopes paper and Hopping Too Late do by default, or one fixed state), on the prompt
pass only; the same model then generates greedily from the patched prompt, and the generation's first
line is classified as e1, e2 (the bridge), e3 (the answer) or other: the item entity whose name (or an
alias) the grader (`twohop.evaluation.grading`) finds stated first, a name counting only outside a
mention of the others ("Austin" inside "University of Texas at Austin" names the university).

Two description prompts (`PROMPTS`), each rendered as a chat user turn (for a model with a chat
template: it answers a question, it does not continue text) or as raw text after BOS (a base model):
- `identity`, token identity: chat "Repeat these names: x." (the copy instruction of the tiny
  model's pretraining); raw the few-shot "dog:dog, Japan:Japan, x:x, x" of `prompt_families`.
- `entity`, entity description: chat "Tell me about x"; raw three few-shot lines "name: name" over
  entities of the run's own test set (people, cities, attribute values), chosen per item and never
  naming, or named inside, that item's own e1, e2 or e3, then "x".
With target = source and a chat rendering, patching the last state changes nothing (no later token
reads it at the placeholder); with a raw rendering it sets the first generated token (a logit lens).

Each item also gets controls: its unpatched two-hop reply (graded, which splits the headlines into
answered right or wrong, and classified), and each prompt with e1, e2 or e3 written in place of x, or
with x itself, unpatched. A prompt whose text control already turns e1's name into e2 (a model that
answers "Tell me about e1" with e1's spouse) reads e2 from any state that only encodes e1: read the
headlines beside the controls.

Headlines per prompt: the share of items whose t1 state names e2 and whose t2 state names e3 at any
source state, with the earliest such state, over all items and split by the unpatched answer.
Rows are generated a chunk of items at a time (one clean pass caches every state at t1 and t2;
`backpatching.patched_replies` writes each row's own patch), so a killed run can continue.

Exactness: a self-Patchscope (a prompt's own state written back into itself at the same state and
position) is the identity, checked at the start of every run by `self_check` (after the hooks'
parity check), and on a planted model the decoded entity is known exactly (tests).
"""
import random
import statistics
from collections import Counter
from dataclasses import dataclass

import torch

from runner.errors import UserError
from twohop import stats
from twohop.data.base_corpus import COPY_PROMPTS
from twohop.evaluation.grading import answer_positions, grade, mentions, split_aliases
from twohop.interp.backpatching import Query, clean_states, patched_replies
from twohop.interp.hooks import Batch
from twohop.interp.prompt_families import PATCHSCOPE, chat, raw

PLACEHOLDER = "x"
SHOTS = 3
PROMPTS = {("identity", "chat"): COPY_PROMPTS[1].replace("{names}", "{x}"), ("identity", "raw"): PATCHSCOPE,
           ("entity", "chat"): "Tell me about {x}", ("entity", "raw"): "{shots}{x}"}
LABELS = ("e1", "e2", "e3", "other")
HEADLINES = (("t1", "e2"), ("t2", "e3"))  # (position, the entity it should name)
CONTROLS = ("text_e1", "text_e2", "text_e3", "placeholder")


def entities(record: dict) -> dict:
    """{e1, e2, e3: (name, aliases)} of a two-hop row (answer and bridge may be alias lists)."""
    e2, e2_aliases = split_aliases(record.get("answer_intermediate"))
    e3, e3_aliases = split_aliases(record["answer"])
    return {"e1": (record.get("e1", ""), ()), "e2": (e2, e2_aliases),
            "e3": (e3, (*e3_aliases, *record.get("aliases", ())))}


def classify(generation: str, named_entities: dict) -> dict:
    """{label, named}: the entities stated in the generation's first line in order of first mention (a
    name inside another's mention does not count); label is the first, or "other"."""
    line = generation.split("\n")[0]
    found = []
    for label, (name, aliases) in named_entities.items():
        others = [n for other, (o, more) in named_entities.items() if other != label for n in (o, *more) if n]
        stated, _ = answer_positions(line, name, aliases, others) if name else ([], [])
        if stated:
            found.append((stated[0], label))
    named = [label for _, label in sorted(found)]
    return {"label": named[0] if named else "other", "named": named}


def render_style(tokenizer, render: str) -> str:
    """chat or raw: `render`, or for auto, chat where the tokenizer has a chat template."""
    if render != "auto":
        return render
    return "chat" if getattr(tokenizer, "chat_template", None) else "raw"


def _render(tokenizer, content: str, style: str) -> str:
    return chat(tokenizer, content) if style == "chat" else raw(tokenizer, content)


def placeholder_index(tokenizer, prompt: str, content: str, start: int) -> int:
    """The token of `prompt` holding the placeholder at character `start` of `content`; refused
    unless it is one token of its own (a leading space allowed)."""
    where = prompt.rfind(content) + start
    offsets = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    hits = [i for i, (s, e) in enumerate(offsets) if s < where + len(PLACEHOLDER) and e > where]
    if len(hits) != 1 or prompt[offsets[hits[0]][0]:offsets[hits[0]][1]].strip() != PLACEHOLDER:
        raise UserError(f"the Patchscope placeholder {PLACEHOLDER!r} is not one token of its own in {prompt[-60:]!r} "
                        f"with this tokenizer ({type(tokenizer).__name__})")
    return hits[0]


@dataclass
class Description:
    """One description prompt of one item: token ids, the placeholder's index, and the unpatched
    controls ({text_e1, text_e2, text_e3, placeholder: token ids})."""
    kind: str
    ids: list
    placeholder: int
    controls: dict


def few_shot(pool: list, record: dict, rng: random.Random) -> str:
    """SHOTS lines "name: name" over `pool`, none naming or named inside the record's entities."""
    own = [n for name, aliases in entities(record).values() for n in (name, *aliases) if n]
    allowed = [p for p in pool if not any(mentions(p, n) or mentions(n, p) for n in own)]
    return "".join(f"{name}: {name}\n" for name in rng.sample(allowed, min(SHOTS, len(allowed))))


def describe(tokenizer, query: Query, kind: str, style: str, pool: list) -> Description:
    """The `kind` prompt of one item in `style`, its placeholder located, with its text controls."""
    text = PROMPTS[(kind, style)]
    if "{shots}" in text:
        text = text.replace("{shots}", few_shot(pool, query.record, random.Random(f"{query.id}:{kind}")))
    before, after = text.split("{x}")
    content = before + PLACEHOLDER + after
    prompt = _render(tokenizer, content, style)
    encode = lambda p: tokenizer(p, add_special_tokens=False)["input_ids"]  # noqa: E731
    controls = {f"text_{label}": encode(_render(tokenizer, before + name + after, style))
                for label, (name, _) in entities(query.record).items() if name}
    return Description(kind, encode(prompt), placeholder_index(tokenizer, prompt, content, len(before)),
                       {**controls, "placeholder": encode(prompt)})


def descriptions(tokenizer, queries: list, kinds, style: str) -> dict:
    """{query id: [Description per kind]}; the few-shot pool is every entity name of `queries`."""
    pool = sorted({name for q in queries for name, _ in entities(q.record).values() if name})
    return {q.id: [describe(tokenizer, q, kind, style, pool) for kind in kinds] for q in queries}


def item_jobs(index: int, query: Query, described: list, positions, states, target_state) -> list:
    """[(prompt kind, backpatching job)] of one item: its unpatched reply, every control, and every
    (position, source state) patched into each description's placeholder."""
    jobs = [(None, (query, index, "question", None, None))]
    for d in described:
        jobs += [(d.kind, (Query(query.id, ids, {}, query.record), index, name, None, None))
                 for name, ids in d.controls.items()]
        target = Query(query.id, d.ids, {p: d.placeholder for p in positions}, query.record)
        jobs += [(d.kind, (target, index, p, s, s if target_state == "same" else target_state))
                 for p in positions for s in states]
    return jobs


def row_key(row: dict) -> tuple:
    return row["item"], row["prompt"], row["position"], row["source"], row["target"]


def scope_row(kind, job: tuple, generation: str) -> dict:
    query, _, position, source, target = job
    named = entities(query.record)
    row = {"item": query.id, **{label: name for label, (name, _) in named.items()}, "prompt": kind,
           "position": position, "source": source, "target": target, "generation": generation,
           **classify(generation, named)}
    if position == "question":
        row["correct"] = grade(query.record, generation, "nocot", aliases=query.record.get("aliases", ()))["correct"]
    return row


def scope_rows(model, tokenizer, queries: list, described: dict, positions, states, target_state, batch_size: int,
               max_new_tokens: int, done=frozenset()):
    """Yield the rows of every item (see `item_jobs`) a chunk of items at a time, skipping keys in `done`."""
    device = next(model.parameters()).device
    for start in range(0, len(queries), batch_size):
        chunk = queries[start:start + batch_size]
        todo = [(kind, job) for i, q in enumerate(chunk)
                for kind, job in item_jobs(i, q, described[q.id], positions, states, target_state)
                if (q.id, kind, job[2], job[3], job[4]) not in done]
        if not todo:
            continue
        cache = clean_states(model, Batch.left_padded([q.ids for q in chunk], tokenizer.pad_token_id, device), chunk)
        todo.sort(key=lambda kind_job: len(kind_job[1][0].ids))  # similar lengths together: little padding
        for first in range(0, len(todo), batch_size):
            part = todo[first:first + batch_size]
            replies = patched_replies(model, tokenizer, [job for _, job in part], cache, max_new_tokens)
            yield [scope_row(kind, job, reply) for (kind, job), reply in zip(part, replies)]


def check_states(states: int, source_states: list, target_state) -> list:
    """The source states to read (all where `source_states` is empty), refused outside 0..states-1."""
    wanted = list(source_states) or list(range(states))
    bad = [s for s in wanted + ([] if target_state == "same" else [target_state]) if not 0 <= s < states]
    if bad:
        raise UserError(f"states {bad}: this model has states 0..{states - 1} (0 = embeddings)")
    return wanted


def share(hits: int, n: int) -> dict:
    return {"rate": hits / n if n else None, "se": stats.binomial_se(hits / n, n) if n else None, "n": n}


def readable(rows: list, groups: dict, position: str, label: str) -> dict:
    """Per group of items: the share whose `position` names `label` at any source state, and the
    earliest such state (median and minimum over those items, and how many at each state)."""
    states = {}
    for r in rows:
        if r["position"] == position and r["source"] is not None and r["label"] == label:
            states.setdefault(r["item"], set()).add(r["source"])
    out = {}
    for group, items in groups.items():
        earliest = [min(states[i]) for i in items if i in states]
        out[group] = {**share(len(earliest), len(items)),
                      "earliest_median": statistics.median(earliest) if earliest else None,
                      "earliest_min": min(earliest) if earliest else None,
                      "earliest": {str(s): c for s, c in sorted(Counter(earliest).items())}}
    return out


def label_shares(rows: list) -> dict:
    """{label: share} of the rows (one per item)."""
    counts = Counter(r["label"] for r in rows)
    return {label: share(counts[label], len(rows)) for label in LABELS}


def curves(rows: list) -> dict:
    """{position: [{source, target, label shares}]}: what each patched (position, source, target) names."""
    cells = {}
    for r in rows:
        if r["source"] is not None:
            cells.setdefault((r["position"], r["source"], r["target"]), []).append(r)
    out = {}
    for (position, source, target), members in sorted(cells.items(), key=lambda c: (c[0][0], c[0][1], c[0][2])):
        out.setdefault(position, []).append({"source": source, "target": target, **label_shares(members)})
    return out


def summarise(rows: list) -> dict:
    """Accuracy of the unpatched replies, and per description prompt the headlines (`readable` for
    e2 at t1 and e3 at t2, over all items and split right / wrong), the curves and the controls."""
    correct = {r["item"]: r["correct"] for r in rows if r["position"] == "question"}
    groups = {"all": list(correct), "right": [i for i, c in correct.items() if c],
              "wrong": [i for i, c in correct.items() if not c]}
    out = {"n": len(correct), "accuracy": share(len(groups["right"]), len(correct)),
           "right": len(groups["right"]), "wrong": len(groups["wrong"]), "prompts": {}}
    for kind in sorted({r["prompt"] for r in rows if r["prompt"]}):
        mine = [r for r in rows if r["prompt"] == kind]
        positions = {r["position"] for r in mine}
        out["prompts"][kind] = {
            "readable": {f"{label}_at_{p}": readable(mine, groups, p, label) for p, label in HEADLINES if p in positions},
            "curves": curves(mine),
            "controls": {c: label_shares([r for r in mine if r["position"] == c]) for c in CONTROLS if c in positions}}
    out["question_labels"] = label_shares([r for r in rows if r["position"] == "question"])
    return out


def example_prompts(tokenizer, described: dict) -> dict:
    """{kind: the first item's rendered description prompt}, for the report."""
    first = next(iter(described.values()), [])
    return {d.kind: tokenizer.decode(d.ids) for d in first}


@torch.no_grad()
def self_check(model, tokenizer, query: Query, positions, states, max_new_tokens: int) -> int:
    """A self-Patchscope must be the identity: the prompt's own state at each (position, state) written
    back into itself at the same state and position leaves its greedy reply as it is; refused otherwise.
    Returns the number of patched replies compared."""
    batch = Batch.left_padded([query.ids], tokenizer.pad_token_id, next(model.parameters()).device)
    cache = clean_states(model, batch, [query])
    jobs = [(query, 0, "none", None, None)] + [(query, 0, p, s, s) for p in positions for s in states]
    unpatched, *patched = patched_replies(model, tokenizer, jobs, cache, max_new_tokens)
    changed = [(job[2], job[3]) for job, reply in zip(jobs[1:], patched) if reply != unpatched]
    if changed:
        raise UserError(f"self-Patchscope check failed on {model.config.model_type}: writing {query.id}'s own states "
                        f"back changed its reply at (position, state) {changed[:3]}; no Patchscope is run")
    return len(patched)
