"""Linear probes on residual states, split by entity, each beside a control task (seed 003's
"use_linear_probes"; selectivity after Hewitt and Liang, EMNLP 2019).

For every two-hop question the residual states (0 = embeddings, i = decoder layer i's output, as in
`twohop.interp.hooks`) are read at t1 (the last token of e1's mention) and t2 (the last prompt token)
in one clean pass. At each (position, state) a multinomial logistic regression is trained to read a
label of the question from the state:

- `e2`: the bridge entity itself; `e2_first_token`: the first token of e2 as a reply (a first name
  for the spouses' people), a class that recurs across questions where e2 does not; `e3`: the answer,
  over the answers of the training questions (the candidate set as the data use it; with several
  tests, e.g. one per attribute, each answer is a class of its own test);
- a binary label (`correct`: the greedy no-CoT reply graded right by `twohop.evaluation.grading`;
  or any field of the test rows: true where it is set and not empty, false or 0), whose probe is also
  fitted on every question and saved as a direction per state (`twohop.interp.directions`, kind
  "probe") for `steer`.

The split is by entity: all questions about one e1 are on the same side, and so are all e1 whose
last token (the one at t1) is the same (their state 0 at t1 is one vector), so a probe cannot win by
recognising e1's name. A question can only be classified right if its class was seen in training, so
entity groups go to the test side (in a seeded order, up to `test_fraction` of the questions) only
while every label of their questions keeps at least one training question: classes are kept, and
what is held out is precisely a set of e1 groups whose classes other groups share. Where every class
belongs to one group (the spouses' e2: one person per e1; the universities' e2: one university per
e1, asked about in four questions; the universities' e3: an e1's four questions include a founding
year no other e1's university has) nothing can be held out and the target is reported as not
measurable; `measurability` says how many questions could be tested at most. Names that share a
part other than the last token (Achterberg-Blackwood, Abernathy-Achterberg) can still be on both
sides: with few entities, a later state may match such parts to labels by coincidence, which the
control (a different labelling) does not repeat; state 0 at t1, which holds e1's last token only,
is the check that should stay at chance.

Control task: the same probe, same regulariser and same split rule, on labels that assign each
entity a random label (a seeded permutation of the entities' labels, so class sizes are kept; an
entity whose questions carry different labels, e.g. one answer per attribute, is permuted within
each test instead). It measures what a probe of this capacity gets from the split, the class sizes
and the states' structure alone. Selectivity = accuracy - control accuracy, per split seed.

Logistic regression: features standardised with the training questions' mean and standard
deviation (a feature constant on them, e.g. every state at t2 of layer 0, where every prompt ends in
the same token, is set to 0); weights minimise the summed cross-entropy plus l2/2 ||W||^2 (bias not
penalised) by full-batch L-BFGS in float64 from zero; l2 = 1 is scikit-learn's default (C = 1).
Chance of a split = the higher of 1 / (training classes) and the test accuracy of always answering
the commonest training class. Headlines are means over split seeds; a standard error is the larger
of the spread over splits, corrected for their overlap (Nadeau and Bengio 2003), and the binomial
s.e. over the distinct questions tested (where few entities can be held out, every split holds out
nearly the same ones and the spread says nothing). A target is "decodable" at a state where the
mean accuracy is above chance and the selectivity is more than two standard errors above 0.

Directions: the binary probe fitted on every question at one position; per state, the gradient of
its log-odds (positive class minus negative) with respect to the raw state, i.e. the weights divided
by the standardising scale, stored as float32.
"""
import random
from collections import Counter

import torch

from runner.errors import UserError
from twohop import stats
from twohop.evaluation.grading import split_aliases
from twohop.interp import backpatching
from twohop.interp.hooks import Batch
from twohop.interp.patching import first_reply_token

TARGETS = ("e2", "e2_first_token", "e3")
POSITIONS = ("t1", "t2")


@torch.no_grad()
def question_states(model, queries: list, pad_id: int, batch_size: int) -> dict:
    """{t1, t2: float32 [questions, states, hidden] on the CPU}: every state of one clean pass."""
    device = next(model.parameters()).device
    parts = {position: [] for position in POSITIONS}
    for start in range(0, len(queries), batch_size):
        chunk = queries[start:start + batch_size]
        cache = backpatching.clean_states(model, Batch.left_padded([q.ids for q in chunk], pad_id, device), chunk)
        for position in POSITIONS:
            parts[position].append(cache[position].float().cpu())
    return {position: torch.cat(found) for position, found in parts.items()}


def graded_replies(model, tokenizer, queries: list, batch_size: int, max_new_tokens: int) -> list:
    """Back-patching's unpatched rows (reply, correct, rule) of every question, in order: greedy, graded."""
    rows = []
    for start in range(0, len(queries), batch_size):
        jobs = [(query, 0, "none", None, None) for query in queries[start:start + batch_size]]
        replies = backpatching.patched_replies(model, tokenizer, jobs, {}, max_new_tokens)
        rows += [backpatching.job_row(job, reply) for job, reply in zip(jobs, replies)]
    return rows


def binary_values(label: str) -> tuple:
    """(positive, negative) class names of a binary label."""
    return ("correct", "wrong") if label == "correct" else (label, f"no {label}")


def question_labels(tokenizer, queries: list, targets, label: str = "", graded=()) -> list:
    """One dict per question: item, e1, test, e2, e3, and its class for every target and the label
    (`graded`: `graded_replies` rows where the label is "correct"; their reply is kept)."""
    tests = {q.id.rsplit(":", 1)[0] for q in queries}
    if label and label != "correct" and not any(label in q.record for q in queries):
        raise UserError(f"label {label!r}: not 'correct' and not a field of the test rows "
                        f"({', '.join(sorted(queries[0].record))})")
    out = []
    for index, query in enumerate(queries):
        record, test = query.record, query.id.rsplit(":", 1)[0]
        bridge, answer = split_aliases(record.get("answer_intermediate"))[0], split_aliases(record["answer"])[0]
        if not bridge and any(t.startswith("e2") for t in targets):
            raise UserError(f"{query.id}: the question names no bridge (answer_intermediate); drop e2 and "
                            "e2_first_token from targets")
        item = {"item": query.id, "e1": record["e1"], "test": test, "e2": bridge, "e3": answer,
                "t1_token": tokenizer.decode([query.ids[query.positions["t1"]]])}
        classes = {"e2": bridge, "e3": answer if len(tests) == 1 else f"{test}: {answer}"}
        if "e2_first_token" in targets:
            classes["e2_first_token"] = tokenizer.decode([first_reply_token(tokenizer, bridge)])
        item.update({target: classes[target] for target in targets})
        if label == "correct":
            item.update(reply=graded[index]["reply"], rule=graded[index]["rule"])
            item[label] = binary_values(label)[0 if graded[index]["correct"] else 1]
        elif label:
            item[label] = binary_values(label)[0 if record.get(label) else 1]
        out.append(item)
    for item, group in zip(out, entity_groups([i["e1"] for i in out], [i["t1_token"] for i in out])):
        item["group"] = group
    return out


def entity_groups(e1s: list, tokens: list) -> list:
    """Each question's unit of the split: its e1, joined with every e1 whose last token (the token at
    t1) is the same, named by the group's first e1. Such names have the same state 0 at t1, so holding
    one out while training on the other would let a probe match name tokens instead of reading states."""
    parent = {}

    def root(node):
        while parent.setdefault(node, node) != node:
            node = parent[node]
        return node
    for e1, token in zip(e1s, tokens):
        parent[root(("e1", e1))] = root(("token", token))
    members = {}
    for e1 in e1s:
        members.setdefault(root(("e1", e1)), set()).add(e1)
    return [min(members[root(("e1", e1))]) for e1 in e1s]


def label_counts(items: list, label: str) -> dict:
    return {value: sum(item[label] == value for item in items) for value in binary_values(label)}


def label_refusal(items: list, label: str, min_class: int):
    """Why the binary label is neither probed nor saved as a direction (a class with fewer than
    `min_class` questions), or None."""
    counts = label_counts(items, label)
    if min(counts.values()) >= min_class:
        return None
    shown = ", ".join(f"{n} {value}" for value, n in counts.items())
    return (f"label {label!r}: {shown} of {len(items)} questions; fewer than min_class={min_class} in a class, so "
            "it is not probed and no direction is saved (a probe of so few examples would be noise)")


def measurability(labels: list, groups: list) -> dict:
    """How many questions a probe split by entity can test at most: those of the entity groups whose
    every class belongs to another group too (so it can be held out with its classes kept)."""
    owners, of_group = {}, {}
    for value, group in zip(labels, groups):
        owners.setdefault(value, set()).add(group)
        of_group.setdefault(group, set()).add(value)
    shared = {value for value, members in owners.items() if len(members) > 1}
    holdable = {group for group, values in of_group.items() if values <= shared}
    return {"questions": len(labels), "groups": len(of_group), "classes": len(owners),
            "classes_shared_by_groups": len(shared), "testable": sum(group in holdable for group in groups)}


def entity_split(labels: list, groups: list, test_fraction: float, seed: int) -> tuple:
    """(train, test) question indices. Whole entities (`groups`, e.g. e1) go to the test side in a
    seeded order while it holds at most `test_fraction` of the questions and every label of their
    questions keeps at least one training question. No entity is on both sides."""
    members = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    order = sorted(members)
    random.Random(seed).shuffle(order)
    left, test, budget = Counter(labels), [], test_fraction * len(labels)
    for group in order:
        need = Counter(labels[i] for i in members[group])
        if len(test) + len(members[group]) <= budget and all(left[value] > n for value, n in need.items()):
            test += members[group]
            left -= need
    held = set(test)
    return [i for i in range(len(labels)) if i not in held], sorted(test)


def control_labels(labels: list, groups: list, strata: list, seed: int) -> list:
    """Hewitt and Liang's control task: each entity takes the label of another (a seeded permutation
    of the entities' labels, so class sizes are kept). Where an entity's questions carry different
    labels (one answer per test), each (test, entity) is permuted within its test."""
    per_entity = all(len({v for v, g in zip(labels, groups) if g == group}) == 1 for group in set(groups))
    owners = list(groups) if per_entity else list(zip(strata, groups))
    stratum = {owner: "" if per_entity else owner[0] for owner in owners}
    label_of = dict(zip(owners, labels))
    rng, new = random.Random(seed), {}
    for name in sorted(set(stratum.values())):
        members = sorted(owner for owner in label_of if stratum[owner] == name)
        shuffled = rng.sample(members, len(members))
        new.update({owner: label_of[source] for owner, source in zip(members, shuffled)})
    return [new[owner] for owner in owners]


def standardiser(x: torch.Tensor) -> tuple:
    """(mean, scale) over the rows (dim -2) of `x` [..., rows, features]; a feature constant on them
    gets scale inf, so it becomes 0."""
    mean, scale = x.mean(-2, keepdim=True), x.std(-2, unbiased=False, keepdim=True)
    constant = scale <= 1e-6 * scale.mean(-1, keepdim=True)
    return mean, torch.where(constant, torch.full_like(scale, float("inf")), scale)


def objective(weights, bias, x, y, l2: float) -> tuple:
    """(loss, d loss / d weights, d loss / d bias) of independent multinomial logistic regressions:
    the summed cross-entropy of x [problems, rows, features] with labels y [rows] (the same in every
    problem) + l2/2 ||weights||^2 (weights [problems, classes, features], bias [problems, classes]),
    the gradient written out (softmax minus one-hot)."""
    log_p = (x @ weights.transpose(1, 2) + bias[:, None, :]).log_softmax(-1)
    index = y[None, :, None].expand(len(x), -1, 1)
    loss = -log_p.gather(2, index).sum() + 0.5 * l2 * weights.pow(2).sum()
    residual = log_p.exp().scatter_add(2, index, torch.full(index.shape, -1.0, dtype=log_p.dtype))
    return loss, residual.transpose(1, 2) @ x + l2 * weights, residual.sum(1)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float = 1.0, max_iter: int = 2000) -> tuple:
    """(weights [problems, classes, features], bias [problems, classes]) minimising `objective` on
    x [problems, rows, features]: full-batch L-BFGS in float64 from zero over all problems at once
    (their objectives add up and share no parameter), until the largest gradient entry is below 1e-3
    (measured on the spouses' states: the summed loss, ~300, within 1e-4 of its minimum, the weights
    within 1e-3)."""
    x = x.double()
    weights = torch.zeros(len(x), classes, x.shape[-1], dtype=torch.float64)
    bias = torch.zeros(len(x), classes, dtype=torch.float64)
    if classes > 1:
        weights.grad, bias.grad = torch.zeros_like(weights), torch.zeros_like(bias)
        optimiser = torch.optim.LBFGS([weights, bias], max_iter=max_iter, tolerance_grad=1e-3, tolerance_change=1e-12,
                                      history_size=20, line_search_fn="strong_wolfe")

        def closure():
            loss, grad_weights, grad_bias = objective(weights, bias, x, y, l2)
            weights.grad.copy_(grad_weights)
            bias.grad.copy_(grad_bias)
            return loss
        optimiser.step(closure)
    return weights, bias


def fit_probes(x: torch.Tensor, labels: list, l2: float) -> tuple:
    """(predict, classes, raw weights [problems, classes, hidden]): one probe of `labels` per problem
    on x [rows, problems, hidden] (e.g. problems = states). predict(rows [m, problems, hidden]) gives
    [problems][m] class names; the raw weights act on unstandardised states."""
    classes = sorted(set(labels))
    x = x.double().transpose(0, 1)
    mean, scale = standardiser(x)
    z, y = (x - mean) / scale, torch.tensor([classes.index(value) for value in labels])
    if z.shape[1] < z.shape[2]:  # the L2 optimum lies in the span of the training rows: solve in its coordinates
        basis = torch.linalg.svd(z, full_matrices=False).Vh  # [problems, rows, hidden], orthonormal rows
        weights, bias = fit_logistic(z @ basis.transpose(1, 2), y, len(classes), l2)
        weights = weights @ basis
    else:
        weights, bias = fit_logistic(z, y, len(classes), l2)

    def predict(rows: torch.Tensor) -> list:
        logits = ((rows.double().transpose(0, 1) - mean) / scale) @ weights.transpose(1, 2) + bias[:, None, :]
        return [[classes[k] for k in problem] for problem in logits.argmax(-1).tolist()]
    return predict, classes, weights / scale


def split_rows(states: dict, labels: list, split: tuple, items: list, l2: float) -> list:
    """One row per test question, position and state: the probes (every position and state fitted
    together) trained on `split`'s training side."""
    train, test = split
    counts = Counter(labels[i] for i in train)
    majority = min(counts, key=lambda value: (-counts[value], value))
    cells = [(position, state) for position, x in states.items() for state in range(x.shape[1])]
    x = torch.cat(list(states.values()), dim=1)
    predict, classes, _ = fit_probes(x[train], [labels[i] for i in train], l2)
    return [{"position": position, "state": state, "item": items[i]["item"], "e1": items[i]["e1"],
             "label": labels[i], "predicted": predicted, "correct": predicted == labels[i], "classes": len(classes),
             "majority": majority, "train": len(train)}
            for (position, state), predictions in zip(cells, predict(x[test]))
            for i, predicted in zip(test, predictions)]


def sweep(states: dict, items: list, targets, seeds: int, test_fraction: float, l2: float, progress=None) -> list:
    """Every test prediction of every target, split seed, task (probe, control), position and state."""
    groups, e1s, strata = [item["group"] for item in items], [item["e1"] for item in items], [i["test"] for i in items]
    rows, done = [], 0
    for target in targets:
        labels = [item[target] for item in items]
        for seed in range(seeds):
            for task, task_labels in (("probe", labels), ("control", control_labels(labels, e1s, strata, seed))):
                split = entity_split(task_labels, groups, test_fraction, seed)
                assert not {e1s[i] for i in split[0]} & {e1s[i] for i in split[1]}, "an e1 on both sides of a split"
                if split[1]:
                    rows += [{"target": target, "task": task, "seed": seed, **row}
                             for row in split_rows(states, task_labels, split, items, l2)]
            done += 1
            if progress:
                progress(done, len(targets) * seeds)
    return rows


def _accuracy(rows: list):
    return sum(row["correct"] for row in rows) / len(rows) if rows else None


def _binomial_se(rate, n: int) -> float:
    return stats.binomial_se(rate, n) if rate is not None and n else 0.0


def _cell(rows: list) -> dict:
    """Accuracy, control and selectivity of one (target, position, state): means over split seeds, each
    s.e. the larger of the overlap-corrected spread over splits and the binomial s.e. over the distinct
    questions tested (splits that hold out the same questions have no spread, but few questions are
    still few); with chance, classes and test questions per split."""
    seeds, tested = {}, {"probe": set(), "control": set()}
    for row in rows:
        seeds.setdefault(row["seed"], {}).setdefault(row["task"], []).append(row)
        tested[row["task"]].add(row["item"])
    scores = {"accuracy": [], "control": [], "selectivity": []}
    chance, classes, n_test, ratio = [], [], [], []
    for found in seeds.values():
        probe, controlled = found.get("probe", []), found.get("control", [])
        scores["control"].append(_accuracy(controlled))
        if probe:
            scores["accuracy"].append(_accuracy(probe))
            chance.append(max(1 / probe[0]["classes"], sum(r["label"] == r["majority"] for r in probe) / len(probe)))
            classes.append(probe[0]["classes"])
            n_test.append(len(probe))
            ratio.append(len(probe) / probe[0]["train"])
            if controlled:
                scores["selectivity"].append(scores["accuracy"][-1] - scores["control"][-1])
    mean = lambda values: stats.mean_se(values)[0]  # noqa: E731
    floor = {task: _binomial_se(mean(scores[task]), len(tested["control" if task == "control" else "probe"]))
             for task in ("accuracy", "control")}
    floor["selectivity"] = (floor["accuracy"] ** 2 + floor["control"] ** 2) ** 0.5
    entry = {name: {"mean": mean(values),
                    "se": max(stats.resampled_se(values, mean(ratio) or 0) or 0, floor[name]) if values else None}
             for name, values in scores.items()}
    return {**entry, "chance": mean(chance), "classes": mean(classes), "test_questions": mean(n_test),
            "distinct_test_questions": len(tested["probe"]), "seeds": len(scores["accuracy"])}


def decodable(entry: dict) -> bool:
    """Mean accuracy above chance and selectivity more than two standard errors above 0."""
    accuracy, selectivity = entry["accuracy"], entry["selectivity"]
    return (accuracy["mean"] is not None and entry["chance"] is not None and accuracy["mean"] > entry["chance"]
            and selectivity["se"] is not None and selectivity["mean"] > 2 * selectivity["se"])


def summarise(rows: list, items: list, targets, positions) -> dict:
    """Per target: its measurability, and per position every state's cell and the first decodable state."""
    groups = [item["group"] for item in items]
    cells = {}
    for row in rows:
        cells.setdefault((row["target"], row["position"], row["state"]), []).append(row)
    out = {}
    for target in targets:
        entry = {"measurability": measurability([item[target] for item in items], groups), "positions": {}}
        for position in positions:
            states = [{"state": state, **_cell(members)}
                      for (t, p, state), members in sorted(cells.items()) if (t, p) == (target, position)]
            first = next((e["state"] for e in states if decodable(e)), None)
            entry["positions"][position] = {"states": states, "first_decodable": first}
        out[target] = entry
    return out


def probe_direction(states: torch.Tensor, labels: list, label: str, l2: float) -> dict:
    """{state: float32 [hidden]}: the gradient of the binary probe's log-odds (positive - negative
    class) with respect to the raw state, the probe fitted on every question."""
    positive, negative = binary_values(label)
    _, classes, weights = fit_probes(states, labels, l2)
    difference = weights[:, classes.index(positive)] - weights[:, classes.index(negative)]
    return {state: vector.float() for state, vector in enumerate(difference)}


def headline(summary: dict) -> dict:
    """{"<target>@<position>": first decodable state, the state of largest selectivity, testable questions}."""
    out = {}
    for target, entry in summary.items():
        for position, found in entry["positions"].items():
            measured = [e for e in found["states"] if e["selectivity"]["mean"] is not None]
            best = max(measured, key=lambda e: e["selectivity"]["mean"], default=None)
            out[f"{target}@{position}"] = {
                "first_decodable": found["first_decodable"], "testable": entry["measurability"]["testable"],
                "best": None if best is None else {k: best[k] for k in ("state", "accuracy", "control", "selectivity",
                                                                         "chance", "test_questions")}}
    return out
