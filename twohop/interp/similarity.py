"""The "e2 + r2 = e3" analysis: representation similarity, its correlation with two-hop no-CoT
accuracy, and a logit lens on the bridge entity.

- Similarity: per layer, the cosine between a source family's state (e.g. e2 + r2) and a target
  family's state (e.g. e3) of the same (entity, attribute), against mismatched pairs of the same
  type and attribute (another entity whose value differs).
- Correlation: Spearman's rho between the per-attribute similarity at a layer and the
  per-attribute no-CoT accuracy, with a permutation p-value (exact for small n); and between
  entity-type means, to test "the e2 type drives success" against "vector arithmetic drives it".
- Logit lens: each layer's last-token state of a two-hop question, through the final norm and the
  unembedding: the rank of the bridge entity's first token (0 = top).
"""
import itertools
import math

import numpy as np
import torch

from models.families import final_norm, unembedding
from twohop import stats
from twohop.evaluation import generation
from twohop.interp.hidden_states import row_states


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def spearman(x, y) -> float:
    """Spearman's rho (`twohop.stats.spearman`), NaN where it is undefined (a constant side, n < 2)."""
    rho = stats.spearman(x, y)
    return float("nan") if rho is None else rho


def permutation_p(x, y, samples: int = 10000, seed: int = 0) -> float:
    """Two-sided p-value of Spearman's rho against shuffled pairings: every permutation when
    n! <= samples, else `samples` random ones (the observed pairing counted, so p > 0)."""
    rho = spearman(x, y)
    if math.isnan(rho):
        return float("nan")
    y = np.asarray(y, dtype=float)
    if math.factorial(len(y)) <= samples:
        rhos = [spearman(x, y[list(p)]) for p in itertools.permutations(range(len(y)))]
        return float(np.mean([abs(r) >= abs(rho) - 1e-12 for r in rhos]))
    rng = np.random.default_rng(seed)
    hits = sum(abs(spearman(x, rng.permutation(y))) >= abs(rho) - 1e-12 for _ in range(samples))
    return (hits + 1) / (samples + 1)


def correlation(x, y, samples: int) -> dict:
    return {"rho": spearman(x, y), "p": permutation_p(x, y, samples), "n": len(x)}


def pair_similarity(source, target, layer: int, attributes) -> dict:
    """{attribute: {"matched", "mismatched"}}: mean cosine of same-entity pairs and of pairs whose
    values differ. `source` rows without an attribute (e2 alone) pair with every attribute."""
    out = {}
    for attribute in attributes:
        tgt = target.select({"attribute": attribute})
        by_entity = {source.rows[i]["entity"]: i for i in source.select(lambda row: row["attribute"] in (attribute, ""))}
        src = [by_entity[target.rows[i]["entity"]] for i in tgt]
        sims = cosine_matrix(source.layer(layer, where=src), target.layer(layer, where=tgt))
        values = [target.rows[i]["value"] for i in tgt]
        differ = np.array([[a != b for b in values] for a in values])
        out[attribute] = {"matched": float(np.mean(np.diag(sims))),
                          "mismatched": float(sims[differ].mean()) if differ.any() else float("nan")}
    return out


@torch.no_grad()
def logit_lens_ranks(model, tokenizer, rows: list, batch_size: int = 32) -> np.ndarray:
    """[layers, len(rows)]: the rank of each row's bridge entity's first token at each layer."""
    prompts = [{"prompts": [generation.prompt_text(tokenizer, r["messages"])]} for r in rows]
    states = row_states(model, tokenizer, prompts, ["last"], batch_size)["last"]  # [layers, rows, hidden]
    targets = torch.tensor([tokenizer(r["answer_intermediate"], add_special_tokens=False)["input_ids"][0] for r in rows])
    norm, head = final_norm(model), unembedding(model)
    device = next(model.parameters()).device
    weight_dtype = next(head.parameters()).dtype
    ranks = []
    for layer_states in states:
        logits = head(norm(layer_states.to(device, weight_dtype))).float().cpu()
        target_logit = logits[torch.arange(len(rows)), targets]
        ranks.append((logits > target_logit[:, None]).sum(1).numpy())
    return np.stack(ranks)


def nocot_accuracy(results: dict, entity_type: str) -> dict:
    """'<type>/<attribute>' -> no-CoT two-hop accuracy, from an evaluation's results.json (its card metadata)."""
    return {f"{entity_type}/{s['attribute']}": s["correct"] for s in results["tests"].values()
            if s.get("kind") == "two_hop" and s["style"] == "nocot"}


def layer_row(layer: int, by_attribute: dict, accuracy: dict, entity_types, permutations: int) -> dict:
    """One layer of a family pair: mean similarity of true and mismatched pairs, and its correlations
    with the no-CoT accuracy over (type, attribute) (and over type means when there are > 2 types)."""
    keys = [k for k in accuracy if k in by_attribute]
    matched = [by_attribute[k]["matched"] for k in keys]
    excess = [by_attribute[k]["matched"] - by_attribute[k]["mismatched"] for k in keys]
    acc = [accuracy[k] for k in keys]
    row = {"layer": layer, "matched": float(np.mean(matched)),
           "mismatched": float(np.nanmean([by_attribute[k]["mismatched"] for k in keys])),
           "by_attribute": by_attribute, "corr_matched": correlation(matched, acc, permutations),
           "corr_excess": correlation(excess, acc, permutations)}
    if len(entity_types) > 2:  # does the entity type alone explain it? correlate the type means
        means = {t: [(m, a) for k, m, a in zip(keys, matched, acc) if k.startswith(f"{t}/")] for t in entity_types}
        row["corr_type_means"] = correlation([np.mean([m for m, _ in v]) for v in means.values()],
                                             [np.mean([a for _, a in v]) for v in means.values()], permutations)
    return row


def pair_by_layer(states: dict, source: str, target: str, n_layers: int, attributes: dict, accuracy: dict,
                  permutations: int) -> list:
    """Per layer, the source -> target similarity of every (type, attribute) and its correlation with accuracy.
    `states` maps (entity type, family) to its HiddenStates; `attributes` maps a type to its attributes."""
    rows = []
    for layer in range(n_layers):
        by_attribute = {}
        for entity_type, names in attributes.items():
            sims = pair_similarity(states[(entity_type, source)], states[(entity_type, target)], layer, names)
            by_attribute.update({f"{entity_type}/{a}": s for a, s in sims.items()})
        rows.append(layer_row(layer, by_attribute, accuracy, list(attributes), permutations))
    return rows


def lens_summary(ranks: np.ndarray, vocab: int) -> dict:
    """Per layer: median and mean rank of the bridge's first token, and how often it is top-1 / top-10."""
    return {"n": int(ranks.shape[1]), "vocab": vocab, "by_layer": [
        {"layer": layer, "median_rank": float(np.median(r)), "mean_rank": float(np.mean(r)),
         "top1": float(np.mean(r == 0)), "top10": float(np.mean(r < 10))} for layer, r in enumerate(ranks)]}
