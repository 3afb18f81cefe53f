"""Patchscopes (Ghandeharioun et al., 2024) on two-hop questions: what entity does a hidden state name?

A residual state of the two-hop prompt at position t1 (the last token of e1's mention) or t2 (the
last prompt token) and source state s (0 = embeddings, i = decoder layer i's output) is written into
the placeholder token "x" of a description prompt at a target state, on the prompt pass only; the
same model then generates greedily from the patched prompt, and the generation's first line is
classified as e1, e2 (the bridge), e3 (the answer) or other: the item entity whose name (or an alias)
the grader (`twohop.evaluation.grading`) finds stated first, a name counting only outside a mention
of the others ("Austin" inside "University of Texas at Austin" names the university).

The target state (`state_pairs`): "same" (target = source, the Patchscopes convention: the vector
enters the layers that read it in the model's own pass, in the basis and scale they expect), "all"
(every target for every source, read as "any target", as Hopping Too Late's entity-description
analysis does: L^2 generations per position), or one fixed state (an early one gives every source
state all of the target's layers, at the price of feeding late states to layers that never see
them). Where the placeholder is not the last prompt token (chat rendering), only the target's layers
after the target state can read the patch through attention: patching the last state changes
nothing, and in a 2-layer model state 1 is read by one layer only; with the placeholder last (raw
rendering) the last state sets the first generated token (a logit lens).

Two description prompts (`PROMPTS`), each rendered as a chat user turn (for a model with a chat
template: it answers a question, it does not continue text) or as raw text after BOS (a base model):
- `identity`, token identity: chat "Repeat these names: x." (the copy instruction of the tiny
  model's pretraining); raw the few-shot "dog:dog, Japan:Japan, x:x, x" of `prompt_families`.
- `entity`, entity description: chat "Tell me about x"; raw three few-shot lines "name: name" over
  entities of the run's own test set (people, cities, attribute values), chosen per item and never
  naming, or named inside, that item's own e1, e2 or e3, then "x".

Each item also gets controls: its unpatched two-hop reply (graded, which splits the headlines into
answered right or wrong, and classified), and each prompt with e1, e2 or e3 written in place of x, or
with x itself, unpatched. A prompt whose text control already turns e1's name into e2 (a model that
answers "Tell me about e1" with e1's spouse) reads e2 from any state that only encodes e1: read the
headlines beside the controls.

Headlines per prompt (`readable`): the share of items whose t1 state names e2 and whose t2 state
names e3 (and, beside them, t1 e1 and t2 e2) at some source state while the unpatched placeholder
prompt does not (a prompt that always
answers with one university would otherwise "read" it for that university's items), with the
earliest such state, over all items and split by the unpatched answer; per cell, also the share of
generations the patch changed at all. Rows are generated a chunk of items at a time (one clean pass
caches every state at t1 and t2; `backpatching.patched_replies` writes each row's own patch), so a
killed run can continue.

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
# (position, entity named): the bridge at t1 and the answer at t2 (the headlines), then e1 at t1 (does the
# prompt read the mention's own entity at all) and the bridge at t2 (still there when the answer is due).
HEADLINES = (("t1", "e2"), ("t2", "e3"), ("t1", "e1"), ("t2", "e2"))
CONTROLS = ("text_e1", "text_e2", "text_e3", "placeholder")


def entities(record: dict) -> dict:
    """{e1, e2, e3: (name, aliases)} of a two-hop row (answer and bridge may be alias lists)."""
    e2, e2_aliases = split_aliases(record.get("answer_intermediate"))
    e3, e3_aliases = split_aliases(record["answer"])
    return {"e1": (record.get("e1", ""), ()), "e2": (e2, e2_aliases),
            "e3": (e3, (*e3_aliases, *record.get("aliases", ())))}


def classify(generation: str, named_entities: dict, bridge_candidates=()) -> dict:
    """{label, named}: the entities stated in the generation's first line in order of first mention (a
    name inside another's mention, or inside one of the entities the bridge could have been, does not
    count, as in grading; identical names tie to e1, then e2); label is the first, or "other"."""
    line = generation.split("\n")[0]
    found = []
    for label, (name, aliases) in named_entities.items():
        others = [n for other, (o, more) in named_entities.items() if other != label for n in (o, *more) if n]
        others += [n for n in bridge_candidates if n != name]
        stated, _ = answer_positions(line, name, aliases, others) if name else ([], [])
        if stated:
            found.append((stated[0], label))
    named = [label for _, label in sorted(found)]
    return {"label": named[0] if named else "other", "named": named}


def render_style(tokenizer, render: str) -> str:
    """chat or raw: `render`, or for auto, chat where the tokenizer has a chat template."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if render == "chat" and not has_template:
        raise UserError("render=chat: this tokenizer has no chat template; use render=raw (or auto)")
    return render if render != "auto" else "chat" if has_template else "raw"


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


def item_jobs(index: int, query: Query, described: list, positions, pairs) -> list:
    """[(prompt kind, backpatching job)] of one item: its unpatched reply, every control, and every
    position's source state patched into each description's placeholder at its target state, for
    every (source, target) of `pairs`."""
    jobs = [(None, (query, index, "question", None, None))]
    for d in described:
        jobs += [(d.kind, (Query(query.id, ids, {}, query.record), index, name, None, None))
                 for name, ids in d.controls.items()]
        # patched_replies writes the cached state of position p at target.positions[p]: the placeholder.
        target = Query(query.id, d.ids, {p: d.placeholder for p in positions}, query.record)
        jobs += [(d.kind, (target, index, p, s, t)) for p in positions for s, t in pairs]
    return jobs


def row_key(row: dict) -> tuple:
    return row["item"], row["prompt"], row["position"], row["source"], row["target"]


def scope_row(kind, job: tuple, generation: str) -> dict:
    query, _, position, source, target = job
    named = entities(query.record)
    row = {"item": query.id, **{label: name for label, (name, _) in named.items()}, "prompt": kind,
           "position": position, "source": source, "target": target, "generation": generation,
           **classify(generation, named, query.record.get("bridge_candidates") or ())}
    if position == "question":
        row["correct"] = grade(query.record, generation, "nocot", aliases=query.record.get("aliases", ()))["correct"]
    return row


def scope_rows(model, tokenizer, queries: list, described: dict, positions, pairs, batch_size: int,
               max_new_tokens: int, done=frozenset()):
    """Yield the rows of every item (see `item_jobs`) a chunk of items at a time, skipping keys in `done`."""
    device = next(model.parameters()).device
    for start in range(0, len(queries), batch_size):
        chunk = queries[start:start + batch_size]
        todo = [(kind, job) for i, q in enumerate(chunk)
                for kind, job in item_jobs(i, q, described[q.id], positions, pairs)
                if (q.id, kind, job[2], job[3], job[4]) not in done]
        if not todo:
            continue
        cache = clean_states(model, Batch.left_padded([q.ids for q in chunk], tokenizer.pad_token_id, device), chunk)
        todo.sort(key=lambda kind_job: len(kind_job[1][0].ids))  # similar lengths together: little padding
        for first in range(0, len(todo), batch_size):
            part = todo[first:first + batch_size]
            replies = patched_replies(model, tokenizer, [job for _, job in part], cache, max_new_tokens)
            yield [scope_row(kind, job, reply) for (kind, job), reply in zip(part, replies)]


def state_pairs(states: int, source_states: list, target_state) -> list:
    """(source, target) state pairs: every source state (all where `source_states` is empty) written
    into the same state ("same"), every state ("all", as Hopping Too Late does) or one fixed state;
    refused outside 0..states-1."""
    sources = list(dict.fromkeys(source_states)) or list(range(states))
    targets = [] if target_state in ("same", "all") else [target_state]
    bad = [s for s in sources + targets if not 0 <= s < states]
    if bad:
        raise UserError(f"states {bad}: this model has states 0..{states - 1} (0 = embeddings)")
    if target_state == "same":
        return [(s, s) for s in sources]
    return [(s, t) for s in sources for t in (range(states) if target_state == "all" else targets)]


def share(hits: int, n: int) -> dict:
    return {"rate": hits / n if n else None, "se": stats.binomial_se(hits / n, n) if n else None, "n": n}


def readable(rows: list, groups: dict, position: str, label: str, control: dict) -> dict:
    """Per group of items: the share whose `position` names `label` at some source state (any target)
    while the unpatched placeholder prompt (`control`: {item: row}) does not (a prompt that always
    names one university names it for that university's items: that is not read from the state), the
    earliest such state (median and minimum over those items, and how many at each state), and how
    many items the control already names it for (left out of `rate`'s numerator)."""
    states = {}
    for r in rows:
        if r["position"] == position and r["label"] == label and control[r["item"]]["label"] != label:
            states.setdefault(r["item"], set()).add(r["source"])
    out = {}
    for group, items in groups.items():
        earliest = [min(states[i]) for i in items if i in states]
        out[group] = {**share(len(earliest), len(items)),
                      "earliest_median": statistics.median(earliest) if earliest else None,
                      "earliest_min": min(earliest) if earliest else None,
                      "earliest": {str(s): c for s, c in sorted(Counter(earliest).items())},
                      "control_names_it": sum(control[i]["label"] == label for i in items)}
    return out


def label_shares(rows: list) -> dict:
    """{label: share} of the rows (one per item)."""
    counts = Counter(r["label"] for r in rows)
    return {label: share(counts[label], len(rows)) for label in LABELS}


def cells(rows: list, control: dict, keys=("position", "source")) -> dict:
    """{position: [{source (and target), e1..other, changed}]}: per patched cell, the share of items
    whose generation names each label (in any of their rows: any target, for keys without it) and
    the share whose generation differs from their unpatched placeholder prompt's (the patch was read)."""
    grouped = {}
    for r in rows:
        grouped.setdefault(tuple(r[k] for k in keys), {}).setdefault(r["item"], []).append(r)
    out = {}
    for key, items in sorted(grouped.items()):
        entry = dict(zip(keys[1:], key[1:]))
        for label in LABELS:
            entry[label] = share(sum(any(r["label"] == label for r in found) for found in items.values()), len(items))
        entry["changed"] = share(sum(any(r["generation"] != control[i]["generation"] for r in found)
                                     for i, found in items.items()), len(items))
        out.setdefault(key[0], []).append(entry)
    return out


def summarise(rows: list) -> dict:
    """Accuracy of the unpatched replies, and per description prompt the headlines (`readable` for
    e2 at t1 and e3 at t2, over all items and split right / wrong), what each source state names
    (any target) and each (source, target) pair, and the controls."""
    correct = {r["item"]: r["correct"] for r in rows if r["position"] == "question"}
    groups = {"all": list(correct), "right": [i for i, c in correct.items() if c],
              "wrong": [i for i, c in correct.items() if not c]}
    out = {"n": len(correct), "accuracy": share(len(groups["right"]), len(correct)),
           "right": len(groups["right"]), "wrong": len(groups["wrong"]),
           "question_labels": label_shares([r for r in rows if r["position"] == "question"]), "prompts": {}}
    for kind in sorted({r["prompt"] for r in rows if r["prompt"]}):
        mine = [r for r in rows if r["prompt"] == kind]
        control = {r["item"]: r for r in mine if r["position"] == "placeholder"}
        patched = [r for r in mine if r["source"] is not None]
        positions = {r["position"] for r in patched}
        out["prompts"][kind] = {
            "readable": {f"{label}_at_{p}": readable(patched, groups, p, label, control)
                         for p, label in HEADLINES if p in positions},
            "by_source": cells(patched, control), "pairs": cells(patched, control, ("position", "source", "target")),
            "controls": {c: label_shares([r for r in mine if r["position"] == c]) for c in CONTROLS}}
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
