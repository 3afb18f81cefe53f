"""Circuit discovery over attention heads and MLPs: attribution patching, exact patching, faithfulness.

A component is one attention head or one MLP of a decoder layer (layers numbered from 1, heads from 0;
`head = -1` is the layer's MLP). A head's output is read before the attention's output projection
(`o_proj`, GPT-2's `c_proj`: `models.families.ModelFamily.attention_output`), whose input is the
concatenation of the heads' outputs, [batch, seq, heads * head_dim]: head h is slice h. This holds for
grouped-query attention too (keys and values are shared, but every query head writes its own slice).
An MLP's output is read with a forward hook on the layer's MLP module.

Items are `twohop.interp.patching.Item`s: a clean and a corrupted prompt of the same length, and the
answer and foil tokens. The metric is the logit difference answer - foil at the last prompt token
(clean run: the clean end; corrupted run: the other end). Scores are means over items:

- `attribution`: attribution patching (Nanda; Syed et al. 2023), a first-order estimate of what patching a
  component's clean activation into the corrupted run does to the metric: (a_clean - a_corrupted) .
  (g_clean + g_corrupted) / 2, with g the metric's gradient at the component, from one forward and
  backward pass on each prompt. Averaging the two gradients (the trapezoid rule along the straight path)
  makes it exact where the metric is linear or quadratic in the component's output.
- `exact`: activation patching of one component at a time (every position): the clean activation written
  into the corrupted run, the metric's change.
- `faithfulness`: the clean run with every component outside the top k replaced by its mean over the
  corrupted prompts (mean ablation); (metric - corrupted) / (clean - corrupted): 1 = the k components
  carry the whole clean-vs-corrupted difference.
- `accuracy`: the share of items whose answer beats its foil (ties count half; chance 0.5), optionally with
  some components mean-ablated (are they necessary?).
"""
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from models.families import decoder_layers, family_of, input_embeddings
from runner.errors import UserError
from twohop import stats
from twohop.interp.hooks import Batch, final_logits, mismatch


@dataclass(frozen=True, order=True)
class Component:
    layer: int  # decoder layer, from 1
    head: int  # attention head, from 0; -1: the layer's MLP

    @property
    def name(self) -> str:
        return f"L{self.layer}.MLP" if self.head < 0 else f"L{self.layer}.H{self.head}"

    @property
    def site(self) -> tuple:
        return ("mlp" if self.head < 0 else "attn", self.layer)


def n_heads(model) -> int:
    return model.config.num_attention_heads


def components(model) -> list:
    """Every head then the MLP of each layer, in layer order."""
    return [Component(layer, head) for layer in range(1, len(decoder_layers(model)) + 1)
            for head in list(range(n_heads(model))) + [-1]]


def site_modules(model) -> dict:
    """{("attn", layer): the attention's output projection, ("mlp", layer): the MLP} of every layer."""
    family = family_of(model.config)
    out = {}
    for layer, block in enumerate(decoder_layers(model), start=1):
        out[("attn", layer)] = getattr(getattr(block, family.attention), family.attention_output)
        out[("mlp", layer)] = getattr(block, family.mlp)
    return out


@contextmanager
def on_sites(model, edit):
    """While active, every forward pass calls `edit(site, tensor)` at each site: ("attn", layer) sees the
    heads' concatenated outputs [batch, seq, heads * head_dim], ("mlp", layer) the MLP's output; a tensor
    it returns replaces the activation for the rest of the pass."""
    def before(site):
        def hook(_module, args):
            new = edit(site, args[0])
            return None if new is None else (new, *args[1:])
        return hook

    def after(site):
        def hook(_module, _args, output):
            return edit(site, output)
        return hook

    handles = []
    try:
        for site, module in site_modules(model).items():
            handles.append(module.register_forward_pre_hook(before(site)) if site[0] == "attn" else
                           module.register_forward_hook(after(site)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def head_view(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """[batch, seq, heads * head_dim] as [batch, seq, heads, head_dim] (a view: writes go through)."""
    return tensor.view(*tensor.shape[:-1], heads, tensor.shape[-1] // heads)


def replace(model, new: dict):
    """An `on_sites` context writing, for every component in `new`, its value ([batch, seq, width] or a
    broadcastable [width]) over the component's activation at every position."""
    by_site = {}
    for component, value in new.items():
        by_site.setdefault(component.site, []).append((component.head, value))

    def edit(site, tensor):
        if site not in by_site:
            return None
        tensor = tensor.clone()
        view = head_view(tensor, n_heads(model)) if site[0] == "attn" else None
        for head, value in by_site[site]:
            if head < 0:
                tensor[...] = value.to(tensor.dtype)
            else:
                view[..., head, :] = value.to(tensor.dtype)
        return tensor
    return on_sites(model, edit)


def pick(model, activations: dict, component: Component) -> torch.Tensor:
    """A component's activation out of {site: tensor}: [batch, seq, head_dim] of a head, the MLP's output."""
    tensor = activations[component.site]
    return tensor if component.head < 0 else head_view(tensor, n_heads(model))[..., component.head, :]


@torch.no_grad()
def parity_check(model, batch: Batch, tolerance: float = None) -> float:
    """Run before every discovery: writing every component's own activation back over it (every head's
    slice and every MLP) must leave the logits as they are; refused with one line otherwise. Returns the
    largest difference (tolerance as `hooks.parity_check`'s)."""
    if tolerance is None:
        tolerance = 1e-5 if next(model.parameters()).dtype == torch.float32 else 1e-2
    reference = final_logits(model, batch, last_only=False)
    with read_sites(model) as activations:
        final_logits(model, batch)
    with replace(model, {c: pick(model, activations, c) for c in components(model)}):
        rewritten = final_logits(model, batch, last_only=False)
    real = batch.attention_mask.bool()
    if mismatch(reference[real], rewritten[real], tolerance) is not None:
        raise UserError(f"parity check failed on {model.config.model_type}: writing every head's and MLP's own output "
                        "back changed the logits; the component hooks do not fit this model, so nothing is run")
    return (reference[real] - rewritten[real]).abs().max().item()


def logit_difference(logits: torch.Tensor, items: list) -> torch.Tensor:
    """logit(answer) - logit(foil) per item ([items])."""
    rows = torch.arange(len(items), device=logits.device)
    answers = torch.tensor([i.answer for i in items], device=logits.device)
    foils = torch.tensor([i.foil for i in items], device=logits.device)
    return logits[rows, answers] - logits[rows, foils]


def batches(items: list, pad_id: int, device) -> tuple:
    """(clean, corrupted) left-padded batches of items whose two prompts have the same length."""
    return (Batch.left_padded([i.clean for i in items], pad_id, device),
            Batch.left_padded([i.corrupted for i in items], pad_id, device))


def run_with_gradients(model, batch: Batch, items: list) -> tuple:
    """(metric per item, {site: activation}, {site: d sum(metric) / d activation}) of one forward and
    backward pass; the parameters get no gradient."""
    found = {}

    def keep(site, tensor):
        found[site] = tensor

    def track(_module, _args, output):  # a graph even where the parameters are frozen
        return output if output.requires_grad else output.detach().requires_grad_()

    handle = input_embeddings(model).register_forward_hook(track)
    try:
        with torch.enable_grad(), on_sites(model, keep):
            metric = logit_difference(final_logits(model, batch), items)
            sites = list(found)
            grads = torch.autograd.grad(metric.sum(), [found[s] for s in sites])
    finally:
        handle.remove()
    return (metric.detach(), {s: found[s].detach() for s in sites}, dict(zip(sites, grads)))


def attribution_chunk(model, items: list, pad_id: int) -> tuple:
    """({component: summed attribution score over the items}, clean metrics, corrupted metrics) of a chunk."""
    device = next(model.parameters()).device
    clean, corrupted = batches(items, pad_id, device)
    clean_metric, clean_acts, clean_grads = run_with_gradients(model, clean, items)
    corrupted_metric, corrupted_acts, corrupted_grads = run_with_gradients(model, corrupted, items)
    scores = {}
    for component in components(model):
        delta = pick(model, clean_acts, component).float() - pick(model, corrupted_acts, component).float()
        slope = (pick(model, clean_grads, component).float() + pick(model, corrupted_grads, component).float()) / 2
        scores[component] = (delta * slope).sum().item()
    return scores, clean_metric.tolist(), corrupted_metric.tolist()


@contextmanager
def read_sites(model):
    """Yield {site: activation}, filled by the next forward pass."""
    found = {}
    with on_sites(model, lambda site, tensor: found.__setitem__(site, tensor.detach())):
        yield found


@torch.no_grad()
def exact_chunk(model, items: list, pad_id: int, candidates: list) -> dict:
    """{component: summed change of the corrupted run's metric when its clean activation is patched in}."""
    device = next(model.parameters()).device
    clean, corrupted = batches(items, pad_id, device)
    with read_sites(model) as activations:
        final_logits(model, clean)
    base = logit_difference(final_logits(model, corrupted), items)
    scores = {}
    for component in candidates:
        with replace(model, {component: pick(model, activations, component)}):
            patched = logit_difference(final_logits(model, corrupted), items)
        scores[component] = (patched - base).sum().item()
    return scores


@torch.no_grad()
def mean_chunk(model, items: list, pad_id: int) -> dict:
    """{component: (sum of its activation over the corrupted prompts' real tokens, token count)}."""
    _, corrupted = batches(items, pad_id, next(model.parameters()).device)
    with read_sites(model) as activations:
        final_logits(model, corrupted)
    real = corrupted.attention_mask.bool()
    return {c: (pick(model, activations, c)[real].float().sum(0), int(real.sum())) for c in components(model)}


@torch.no_grad()
def ablated_chunk(model, items: list, pad_id: int, means: dict, ablated_sets: list) -> list:
    """Per set of components: (clean, corrupted) runs' metric per item with those components mean-ablated."""
    prompts = batches(items, pad_id, next(model.parameters()).device)
    out = []
    for ablated in ablated_sets:
        with replace(model, {c: means[c] for c in ablated}):
            out.append(tuple(logit_difference(final_logits(model, batch), items).tolist() for batch in prompts))
    return out


def chunks(items: list, size: int) -> list:
    """Items in chunks of `size`, items of one length together (little padding)."""
    ordered = sorted(items, key=lambda item: len(item.clean))
    return [ordered[start:start + size] for start in range(0, len(ordered), size)]


def mean_activations(model, items: list, pad_id: int, batch_size: int) -> dict:
    """{component: its mean activation over the corrupted prompts' real tokens} (what mean ablation writes)."""
    total = {}
    for chunk in chunks(items, batch_size):
        for component, (summed, count) in mean_chunk(model, chunk, pad_id).items():
            previous = total.get(component, (0, 0))
            total[component] = (previous[0] + summed, previous[1] + count)
    return {component: summed / count for component, (summed, count) in total.items()}


def ablated_metrics(model, items: list, pad_id: int, batch_size: int, means: dict, ablated_sets: list) -> list:
    """Per set of components: (clean, corrupted) runs' metric per item (in `chunks` order) with the set
    mean-ablated."""
    out = [([], []) for _ in ablated_sets]
    for chunk in chunks(items, batch_size):
        for (clean, corrupted), parts in zip(out, ablated_chunk(model, chunk, pad_id, means, ablated_sets)):
            clean += parts[0]
            corrupted += parts[1]
    return out


def accuracy(metrics: list) -> float:
    """The share of items whose answer beats its foil, ties counting half (chance: 0.5)."""
    return sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in metrics) / len(metrics)


def remaining(clean: list, corrupted: list, full_clean: list, full_corrupted: list):
    """The share of the clean - corrupted difference (means over items) that remains: (clean - corrupted)
    of an ablated model over (full_clean - full_corrupted) of the whole one; None where the latter is 0."""
    effect = (sum(full_clean) - sum(full_corrupted)) / len(full_clean)
    return (sum(clean) - sum(corrupted)) / len(clean) / effect if effect else None


def score(model, items: list, pad_id: int, batch_size: int, exact_top: int, progress=None) -> dict:
    """Attribution scores of every component, exact patching of the `exact_top` best by |attribution|
    (0: all): {"clean", "corrupted": metric per item (chunks order), "attribution", "exact": {component:
    mean over items}, "ranking": the checked candidates by |exact|, then the rest by |attribution|}."""
    parts, total = chunks(items, batch_size), len(items)
    attribution, clean, corrupted = {}, [], []
    for done, chunk in enumerate(parts):
        found, clean_part, corrupted_part = attribution_chunk(model, chunk, pad_id)
        for component, value in found.items():
            attribution[component] = attribution.get(component, 0.0) + value / total
        clean, corrupted = clean + clean_part, corrupted + corrupted_part
        if progress:
            progress(min((done + 1) * batch_size, total), 2 * total)
    by_attribution = sorted(attribution, key=lambda c: (-abs(attribution[c]), c))
    candidates = by_attribution[:exact_top] if exact_top else by_attribution
    exact = {c: 0.0 for c in candidates}
    for done, chunk in enumerate(parts):
        for component, value in exact_chunk(model, chunk, pad_id, candidates).items():
            exact[component] += value / total
        if progress:
            progress(total + min((done + 1) * batch_size, total), 2 * total)
    ranking = sorted(candidates, key=lambda c: (-abs(exact[c]), c)) + by_attribution[len(candidates):]
    return {"clean": clean, "corrupted": corrupted, "attribution": attribution, "exact": exact, "ranking": ranking}


def curve_sizes(n: int, top_k: int) -> list:
    """Sizes of the faithfulness curve: 0..top_k one by one, then doubling, then all n components."""
    sizes = list(range(min(top_k, n) + 1))
    while sizes[-1] < n:
        sizes.append(min(n, sizes[-1] * 2))
    return sizes


def faithfulness(model, items: list, pad_id: int, batch_size: int, scored: dict, top_k: int,
                 also_ablate: dict = None) -> dict:
    """The faithfulness curve of the top k: with everything else mean-ablated in the clean and the corrupted
    run alike, the share of the clean - corrupted difference that remains (0 at k = 0, where nothing that
    differs reaches the last token; 1 for all components), and the clean runs' accuracy; the accuracy with
    the top `top_k` mean-ablated (necessity), and with each set of `also_ablate` ({label: components}):
    {"curve": [{k, faithfulness, accuracy}], "accuracy": {...}, "corrupted_accuracy"}."""
    ranking, everything = scored["ranking"], set(scored["ranking"])
    sizes = curve_sizes(len(ranking), top_k)
    ablations = {"none": [], f"top_{top_k}": ranking[:top_k], **(also_ablate or {})}
    sets = [sorted(everything - set(ranking[:k])) for k in sizes] + [sorted(s) for s in ablations.values()]
    means = mean_activations(model, items, pad_id, batch_size)
    metrics = ablated_metrics(model, items, pad_id, batch_size, means, sets)
    curve = [{"k": k, "faithfulness": remaining(*m, scored["clean"], scored["corrupted"]), "accuracy": accuracy(m[0])}
             for k, m in zip(sizes, metrics)]
    return {"curve": curve, "accuracy": {label: accuracy(m[0]) for label, m in zip(ablations, metrics[len(sizes):])},
            "corrupted_accuracy": accuracy(scored["corrupted"])}


def by_name(model) -> dict:
    return {c.name: c for c in components(model)}


def discover(model, items: list, pad_id: int, batch_size: int, top_k: int, exact_top: int,
             also_ablate: dict = None, progress=None) -> dict:
    """Everything measured on one task, JSON-ready (components by name): the clean and corrupted metric
    means, attribution and exact scores (means over items), the ranking and its `top_k`, the rank
    agreement of attribution with exact patching over the checked candidates, the faithfulness curve and
    the accuracies with the top `top_k` (and each of `also_ablate`: {label: component names}) mean-ablated."""
    names = by_name(model)
    scored = score(model, items, pad_id, batch_size, exact_top, progress)
    ablate = {label: [names[n] for n in members] for label, members in (also_ablate or {}).items()}
    found = faithfulness(model, items, pad_id, batch_size, scored, top_k, ablate)
    checked = list(scored["exact"])
    clean, corrupted = (sum(scored[k]) / len(items) for k in ("clean", "corrupted"))
    return {"n": len(items), "clean": clean, "corrupted": corrupted, "effect": clean - corrupted,
            "attribution": {c.name: v for c, v in scored["attribution"].items()},
            "exact": {c.name: v for c, v in scored["exact"].items()},
            "ranking": [c.name for c in scored["ranking"]], "top": [c.name for c in scored["ranking"][:top_k]],
            "attribution_vs_exact_spearman": stats.spearman([scored["attribution"][c] for c in checked],
                                                            [scored["exact"][c] for c in checked]),
            **found}


def score_rows(model, found: dict, labels: dict) -> list:
    """One row per component of one discovery: `labels` (e.g. model and task), layer, head (None: the MLP),
    kind, scores raw and as a fraction of the clean - corrupted effect, rank, whether in the top set."""
    rank = {name: i + 1 for i, name in enumerate(found["ranking"])}
    effect = found["effect"] or None
    rows = []
    for component in components(model):
        name, exact = component.name, found["exact"].get(component.name)
        attribution = found["attribution"][name]
        rows.append({**labels, "component": name, "layer": component.layer,
                     "head": component.head if component.head >= 0 else None,
                     "kind": "mlp" if component.head < 0 else "head", "attribution": attribution, "exact": exact,
                     "attribution_fraction": attribution / effect if effect else None,
                     "exact_fraction": exact / effect if effect and exact is not None else None,
                     "rank": rank[name], "top": name in found["top"]})
    return rows


def compare(before: dict, after: dict, top_k: int) -> dict:
    """Before vs after a fine-tune on one task: Jaccard of the top k (k = 1..top_k), Spearman of the
    attribution scores as fractions of each model's effect (its sign may differ) over every component,
    both top sets, accuracy before and after (forgetting)."""
    names = sorted(before["attribution"])

    def fractions(found):
        return [found["attribution"][n] / (found["effect"] or 1.0) for n in names]
    return {"jaccard": {k: stats.jaccard(before["ranking"][:k], after["ranking"][:k]) for k in range(1, top_k + 1)},
            "spearman_attribution": stats.spearman(fractions(before), fractions(after)),
            "top_before": before["top"], "top_after": after["top"],
            "accuracy_before": before["accuracy"]["none"], "accuracy_after": after["accuracy"]["none"],
            "forgetting": before["accuracy"]["none"] - after["accuracy"]["none"]}
