"""Entity recall and its use (Yang et al., ACL 2024, "Do Large Language Models Latently Perform
Multi-Hop Reasoning?"): does the model recall the bridge entity e2 where a two-hop question names it
only indirectly, and does recalling it more make the answer more like the answer about e2 itself?

A two-hop question such as "In which city was the spouse of e1 born?" holds a *descriptive mention*
of the bridge, "the spouse of e1", naming e2 only through e1 and the first relation r1. Its last token
is where a model resolving the first hop must have e2 in mind. In this project's data the mention is
what the row's `auxiliary_loss_prefix` (the question up to the relation words) ends with, so its end
is the token holding the prefix's last character: t1 (e1's last token) in "the spouse of e1" or "the
person who married e1", the relation word after e1 in "e1's spouse" (" spouse") or "e1's favorite
university" (" university"); never the last prompt token.

- Entity recall. ENTREC(l) = log softmax(W_U norm(x_l))[first token of e2]: the logit lens (the
  model's final norm and unembedding) of residual state l at the mention's end; state 0 = embeddings,
  state i = decoder layer i's output, as in `twohop.interp.hooks`. e2's first token is the one the
  model writes first when it answers with e2 (`generation.reply_ids`).
- First hop. The same ENTREC(l) of the same e2 on two prompts whose mention does not refer to e2:
  e1-substituted (another question's e1 of the same test, whose bridge starts with another token)
  and r1-substituted (the relation words swapped for another relation's, from a given list, e.g.
  "spouse" -> "architect"). The first hop happens at l for an item when ENTREC(l) is higher on the
  real prompt; its frequency over items, per state, is compared with 0.5. A tie means the
  substitution has not reached the mention end by state l (state 0 when the mention-end token itself
  is unchanged): the item is not counted at that state, and ties are reported. State 0 compares
  tokens, not recall: its logit lens is the mention-end token's embedding, so a frequency away from
  0.5 there is a property of the substituted tokens. An r1 substitute changes the mention's own words,
  and with them what the lens predicts next for any name: on the tiny models the default swaps lower
  or raise the lens probability of another question's e2 as much as of this one's, so there the r1
  comparison reports the substitute word, not recall; the e1 comparison has no such confound.
- Second hop. CnstScore = -1/2 (H(p2, p1) + H(p1, p2)), minus the mean of the two cross-entropies
  between the next-token distributions after the two-hop prompt (p2) and after a one-hop question
  about e2 with the second relation (p1, held fixed). The one-hop question is the dataset's own: the
  first second-hop test row about e2 (and the same attribute), e.g. "In what city was e2 born?",
  rendered from its own messages (the shipped ones have no system prompt, as in training; the two-hop
  prompt keeps its own). Adding alpha grad ENTREC(l) to state l at the mention end,
  d CnstScore / d alpha at alpha = 0 is grad_{x_l} CnstScore . grad_{x_l} ENTREC(l); the second hop
  happens at l when it is positive. One forward and one backward pass give the score's gradient at
  every state: a zero vector with requires_grad is added at the mention end of each state
  (`add_to_states`) and `torch.autograd.grad` differentiates with respect to all of them at once; the
  ENTREC gradients are local (norm and unembedding of each state). The last state is left out:
  nothing after it reads the mention end. Each row also carries the cosine of the two gradients: a
  derivative whose cosine is near float precision has no reliable sign.
- Traversal at l: both hops at l for the same item (per substitution). Two independent coin flips
  would give 0.25; the headline compares it with 0.5, as the hops.

A score whose gradient with respect to every state at the mention end is identically zero, or that
does not depend on them (a divergence of a distribution with itself, a score of detached logits),
measures nothing: it is refused with one line, not reported as "no second hop". Frequencies per state
come with their binomial standard error and z against 0.5; the largest over states 1 on is also
given, and is biased upwards by that choice.
"""
import random
import re
import statistics
from dataclasses import dataclass, field

import torch

from models.families import final_norm, unembed
from runner.errors import UserError
from twohop import stats
from twohop.evaluation import generation
from twohop.interp.hooks import Batch, add_to_states, final_logits, n_states, read_states
from twohop.interp.patching import first_reply_token

SUBSTITUTIONS = ("e1", "r1")
MEASURES = ("first_hop_e1", "first_hop_r1", "second_hop", "traversal_e1", "traversal_r1")
CHANCE = 0.5


@dataclass
class Prompt:
    ids: list
    end: int  # token index of the descriptive mention's last token


@dataclass
class Item:
    """A two-hop question: its prompt, the one-hop prompt about e2, e2's first token, the substituted prompts."""
    id: str
    prompt: Prompt
    one_hop: list  # token ids of the one-hop question's prompt
    bridge: int  # e2's first token
    substituted: dict  # {"e1": Prompt or None, "r1": Prompt or None}
    info: dict = field(default_factory=dict)  # e1, e2, e3, the substitutes, the mention-end token; on every row


def descriptive_mention(row: dict) -> str:
    """The question up to the end of the descriptive mention (`auxiliary_loss_prefix`), checked."""
    prefix, question = row.get("auxiliary_loss_prefix") or "", row["question"]
    if not prefix or not question.startswith(prefix) or row["e1"] not in prefix:
        raise UserError(f"entity recall needs auxiliary_loss_prefix, the question up to the end of the mention of e2 "
                        f"(containing e1); got {prefix!r} for {question[:80]!r}")
    return prefix


def render(tokenizer, row: dict, question: str, prefix: str) -> Prompt:
    """`row`'s prompt with its question replaced by `question`, whose descriptive mention ends where `prefix` does."""
    messages = [dict(m) for m in row["messages"]]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last_user]["content"] = messages[last_user]["content"].replace(row["question"], question)
    text = generation.prompt_text(tokenizer, messages)
    start = text.rfind(question)
    if start < 0:
        raise UserError(f"the question {question[:80]!r} does not occur in its rendered prompt")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    last = start + len(prefix) - 1
    end = next(i for i, (s, e) in enumerate(encoded["offset_mapping"]) if s <= last < e)
    return Prompt(encoded["input_ids"], end)


def swap_relation(prefix: str, e1: str, swaps: dict):
    """(prefix, "old -> new") with the first key of `swaps` found as whole words in `prefix` outside e1
    replaced by its value, or None."""
    masked = prefix.replace(e1, "\0" * len(e1))
    for old, new in swaps.items():
        match = re.search(rf"\b{re.escape(old)}\b", masked)
        if match:
            return prefix[:match.start()] + new + prefix[match.end():], f"{old} -> {new}"
    return None


def make_item(tokenizer, row: dict, partner, one_hop_row: dict, swaps: dict, item_id: str) -> Item:
    """The item of a two-hop row; `partner`: the row whose e1 substitutes row's (None: no e1 substitution)."""
    prefix, question, e1 = descriptive_mention(row), row["question"], row["e1"]
    prompt = render(tokenizer, row, question, prefix)
    substituted = {kind: None for kind in SUBSTITUTIONS}
    if partner:
        other = partner["e1"]
        substituted["e1"] = render(tokenizer, row, question.replace(e1, other, 1), prefix.replace(e1, other, 1))
    swapped = swap_relation(prefix, e1, swaps)
    if swapped:
        substituted["r1"] = render(tokenizer, row, swapped[0] + question[len(prefix):], swapped[0])
    one_hop = tokenizer(generation.prompt_text(tokenizer, one_hop_row["messages"]), add_special_tokens=False)
    info = {"e1": e1, "e2": row["answer_intermediate"], "e3": row["answer"], "question": question,
            "mention_end": tokenizer.decode([prompt.ids[prompt.end]]), "e1_substitute": partner and partner["e1"],
            "relation_swap": swapped and swapped[1], "one_hop_question": one_hop_row["question"]}
    return Item(item_id, prompt, one_hop["input_ids"], first_reply_token(tokenizer, row["answer_intermediate"]),
                substituted, info)


def build_items(tokenizer, tests: dict, one_hop_tests: dict, swaps: dict, seed: int = 0, max_items: int = 0) -> tuple:
    """(items, skipped): each two-hop row of `tests` ({name: rows}) with the first one-hop row about its
    e2 (and attribute) in `one_hop_tests`, and a substituting e1 drawn (seeded) from the rows of its test
    whose bridge starts with another token; at most `max_items` (0: all). `skipped` counts the rows without
    a one-hop question (left out) and the items without an e1 substitute or a relation swap."""
    one_hop = {}
    for rows in one_hop_tests.values():
        for row in rows:
            one_hop.setdefault((row.get("e2", ""), row.get("attribute", "")), row)
    rng, items, no_one_hop = random.Random(seed), [], 0
    for name, rows in tests.items():
        bridges = {r["answer_intermediate"]: first_reply_token(tokenizer, r["answer_intermediate"]) for r in rows}
        for index, row in enumerate(rows):
            if max_items and len(items) == max_items:
                break
            target = one_hop.get((row["answer_intermediate"], row.get("attribute", "")))
            if target is None:
                no_one_hop += 1
                continue
            partners = [o for o in rows if o["e1"] != row["e1"]
                        and bridges[o["answer_intermediate"]] != bridges[row["answer_intermediate"]]]
            items.append(make_item(tokenizer, row, rng.choice(partners) if partners else None, target, swaps,
                                   f"{name}:{index}"))
    return items, {"no_one_hop": no_one_hop,
                   **{f"no_{label}": sum(i.substituted[kind] is None for i in items)
                      for kind, label in (("e1", "e1_partner"), ("r1", "relation_swap"))}}


def entity_recall(model, states: torch.Tensor, bridge: torch.Tensor) -> torch.Tensor:
    """ENTREC [items, states] of residual states [items, states, hidden]: the log-probability of each
    item's `bridge` token under the logit lens (final norm, then unembedding)."""
    logits = unembed(model, final_norm(model)(states))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # 16-bit up to float32; float64 stays
    return logits.log_softmax(-1).gather(-1, bridge.view(-1, 1, 1).expand(-1, states.shape[1], 1)).squeeze(-1)


def consistency(two_hop_logits: torch.Tensor, one_hop_logits: torch.Tensor) -> torch.Tensor:
    """CnstScore per item: -1/2 (H(p2, p1) + H(p1, p2)) of the two next-token distributions."""
    two, one = two_hop_logits.log_softmax(-1), one_hop_logits.log_softmax(-1)
    return 0.5 * ((one.exp() * two).sum(-1) + (two.exp() * one).sum(-1))


def _gradient(name: str, output: torch.Tensor, inputs: list) -> list:
    """d output.sum() / d each input; one line refusing an output that does not depend on the inputs or
    whose gradient is identically zero (or not finite)."""
    grads = (torch.autograd.grad(output.sum(), inputs, allow_unused=True) if output.requires_grad
             else [None] * len(inputs))
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
    finite = all(g.isfinite().all() for g in grads)
    if not finite or not any(g.any() for g in grads):
        raise UserError(f"{name}: its gradient with respect to the states at the end of the descriptive mention is "
                        f"{'identically zero' if finite else 'not finite'}, so its derivative would measure nothing "
                        "(as a divergence of a distribution with itself does); refused")
    return grads


def _at(states: dict, cells: tuple) -> torch.Tensor:
    """[cells, states, hidden]: every state read at `cells`."""
    return torch.stack([states[s][cells] for s in sorted(states)], 1)


def second_hop(model, prompts: list, bridge: torch.Tensor, metric, pad_id: int) -> dict:
    """{score [items], entrec [items, states], derivative [items, states - 1], cosine [items, states - 1]}
    of one forward and one backward pass: derivative = d score / d alpha where alpha scales grad ENTREC(l)
    added to state l at each prompt's mention end, cosine = that of the two gradients (a derivative whose
    cosine is near float precision, ~1e-6, has no reliable sign); `metric` maps the last-position logits
    [items, vocab] to a score per item."""
    device = next(model.parameters()).device
    batch = Batch.left_padded([p.ids for p in prompts], pad_id, device)
    cells = batch.cells([p.end for p in prompts])
    dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
    width = model.get_input_embeddings().weight.shape[1]
    zeros = [torch.zeros(len(prompts), width, device=device, dtype=dtype, requires_grad=True)
             for _ in range(n_states(model) - 1)]
    with torch.enable_grad(), read_states(model) as states, \
            add_to_states(model, {s: (*cells, zero) for s, zero in enumerate(zeros)}, batch):
        score = metric(final_logits(model, batch))
    score_grads = torch.stack(_gradient("the second-hop score", score, zeros), 1)
    at_end = _at(states, cells).requires_grad_()
    with torch.enable_grad():
        recall = entity_recall(model, at_end, bridge)
    recall_grad = _gradient("entity recall", recall, [at_end])[0][:, :-1].to(score_grads.dtype)
    derivative = (score_grads * recall_grad).sum(-1)
    norms = score_grads.norm(dim=-1) * recall_grad.norm(dim=-1)
    return {"consistency": score.detach(), "entrec": recall.detach(), "derivative": derivative,
            "cosine": torch.where(norms > 0, derivative / norms, torch.zeros_like(norms))}


@torch.no_grad()
def recall_of(model, prompts: list, bridge: torch.Tensor, pad_id: int) -> torch.Tensor:
    """ENTREC [items, states] at each prompt's mention end."""
    batch = Batch.left_padded([p.ids for p in prompts], pad_id, next(model.parameters()).device)
    with read_states(model) as states:
        final_logits(model, batch)
    return entity_recall(model, _at(states, batch.cells([p.end for p in prompts])), bridge)


def substituted_recall(model, items: list, kind: str, bridge: torch.Tensor, pad_id: int) -> list:
    """Per item, ENTREC [states] of its e2 on its `kind`-substituted prompt (None where it has none)."""
    present = [k for k, item in enumerate(items) if item.substituted[kind]]
    out = [None] * len(items)
    if present:
        values = recall_of(model, [items[k].substituted[kind] for k in present], bridge[present], pad_id)
        for k, value in zip(present, values):
            out[k] = value.tolist()
    return out


def item_rows(item: Item, measured: dict, substituted: dict) -> list:
    """One row per state: ENTREC real and substituted, the derivative and its cosine, and the hops'
    verdicts (None where not measured: no substitute, a tie, or the last state for the second hop).
    `measured`: this item's part of `second_hop`'s result, as lists."""
    rows = []
    for state, value in enumerate(measured["entrec"]):
        last = state == len(measured["derivative"])
        row = {"item": item.id, **item.info, "state": state, "entrec": value, "consistency": measured["consistency"],
               **{key: None if last else measured[key][state] for key in ("derivative", "cosine")}}
        row["second_hop"] = None if last else row["derivative"] > 0
        for kind in SUBSTITUTIONS:
            other = substituted[kind] and substituted[kind][state]
            row[f"entrec_{kind}"] = other
            row[f"first_hop_{kind}"] = None if other is None or other == value else value > other
            row[f"traversal_{kind}"] = (None if other is None or row["second_hop"] is None
                                        else row[f"first_hop_{kind}"] and row["second_hop"])
        rows.append(row)
    return rows


def chunk_rows(model, items: list, pad_id: int, metric=None) -> list:
    """Every row of a few items run together; `metric` (logits, one-hop logits) -> score, default CnstScore."""
    device = next(model.parameters()).device
    bridge = torch.tensor([item.bridge for item in items], device=device)
    with torch.no_grad():
        one_hop = final_logits(model, Batch.left_padded([item.one_hop for item in items], pad_id, device))
    measured = second_hop(model, [item.prompt for item in items], bridge,
                          lambda logits: (metric or consistency)(logits, one_hop), pad_id)
    substituted = {kind: substituted_recall(model, items, kind, bridge, pad_id) for kind in SUBSTITUTIONS}
    return [row for k, item in enumerate(items)
            for row in item_rows(item, {key: values[k].tolist() for key, values in measured.items()},
                                 {kind: values[k] for kind, values in substituted.items()})]


def sweep(model, items: list, pad_id: int, batch_size: int, progress=None) -> list:
    """Every row (item x state), `batch_size` items at a time (items of one length together)."""
    ordered = sorted(items, key=lambda item: len(item.prompt.ids))
    rows = []
    for start in range(0, len(ordered), batch_size):
        rows += chunk_rows(model, ordered[start:start + batch_size], pad_id)
        if progress:
            progress(min(start + batch_size, len(ordered)), len(ordered))
    return rows


def frequency(verdicts: list, state: int) -> dict:
    """{state, frequency, se, z (against 0.5), n} of the True share among the measured verdicts."""
    measured = [v for v in verdicts if v is not None]
    rate = sum(measured) / len(measured) if measured else None
    return {"state": state, "frequency": rate, "se": stats.binomial_se(rate, len(measured)) if measured else None,
            "z": stats.z_vs_chance(rate, CHANCE, len(measured)), "n": len(measured)}


def summarise(rows: list) -> dict:
    """Per state: each measure's frequency (with s.e., z and n), ties of each substitution, mean ENTREC
    (real and substituted), mean derivative and median |cosine|; per measure the entry of the largest
    frequency over decoder layers' outputs (states 1 on: state 0 compares token embeddings)."""
    states = sorted({r["state"] for r in rows})
    at = {s: [r for r in rows if r["state"] == s] for s in states}
    curves = {m: [frequency([r[m] for r in at[s]], s) for s in states] for m in MEASURES}
    mean = lambda key, s: stats.mean_se([r[key] for r in at[s]])[0]  # noqa: E731
    cosines = {s: [abs(r["cosine"]) for r in at[s] if r["cosine"] is not None] for s in states}
    return {"n": len({r["item"] for r in rows}), "states": states, "curves": curves,
            "ties": {kind: [sum(r[f"entrec_{kind}"] == r["entrec"] for r in at[s]) for s in states]
                     for kind in SUBSTITUTIONS},
            "mean": {key: [mean(key, s) for s in states] for key in ("entrec", "entrec_e1", "entrec_r1", "derivative")},
            "median_abs_cosine": [statistics.median(cosines[s]) if cosines[s] else None for s in states],
            "best": {m: max((e for e in curve if e["n"] and e["state"] > 0), key=lambda e: e["frequency"], default=None)
                     for m, curve in curves.items()}}
