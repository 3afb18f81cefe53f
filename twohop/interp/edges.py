"""Edge attribution patching (EAP; Syed, Rager and Conmy 2023) between the components of `circuits`.

Senders write into the residual stream: the embeddings (state 0 of `hooks`), every attention head (its
slice of the output projection's input, projected alone, the projection's bias left out) and every MLP.
Receivers read it: each layer's attention (all its heads together: they read one normalised residual, so
a receiving head is not split from its layer's other heads), each layer's MLP, and the logits (the final
norm's input). An edge u -> d exists where d reads what u wrote: u in an earlier layer (the embeddings
first), or u a head of the layer whose MLP is d.

Score of an edge: (r_u,clean - r_u,corrupted) . (g_d,clean + g_d,corrupted) / 2 summed over positions, the
mean over items, where r_u is u's write and g_d the metric's gradient with respect to the residual as d
alone reads it (a zero added to the input of d's norm). One forward and backward pass per prompt. Like the
node scores of `circuits`, it is exact where the metric is linear or quadratic in what d reads.

Families whose blocks normalise their outputs before adding them (Gemma-2, OLMo-2) are refused: there a
head's write is not a linear function of its output.
"""
from contextlib import ExitStack, contextmanager

import torch

from models.families import decoder_layers, family_of, final_norm
from runner.errors import UserError
from twohop import stats
from twohop.interp import circuits
from twohop.interp.hooks import final_logits, read_states

EMBEDDINGS = "embeddings"


def receivers(model) -> dict:
    """{receiver name: the norm module whose input it reads}, in the order of the forward pass."""
    family = family_of(model.config)
    if not family.attention_norm:
        raise UserError(f"edge attribution: {model.config.model_type} normalises its blocks' outputs; its heads' "
                        "writes are not linear in their outputs (supported: pre-norm families, e.g. llama, gpt2)")
    out = {}
    for layer, block in enumerate(decoder_layers(model), start=1):
        out[f"L{layer}.attn"] = getattr(block, family.attention_norm)
        out[f"L{layer}.mlp"] = getattr(block, family.mlp_norm)
    out["logits"] = final_norm(model)
    return out


def reads(sender: str, receiver: str) -> bool:
    """Whether `receiver` reads what `sender` (a component name or "embeddings") wrote."""
    if receiver == "logits" or sender == EMBEDDINGS:
        return True
    sender_layer, part = sender[1:].split(".")
    layer, kind = receiver[1:].split(".")
    return int(sender_layer) < int(layer) or (int(sender_layer) == int(layer) and kind == "mlp" and part != "MLP")


@contextmanager
def receiver_probes(model):
    """Yield {receiver: zero tensor added to its norm's input}, filled by the next forward pass; their
    gradients are the metric's gradients with respect to the residual as each receiver alone reads it."""
    probes = {}

    def probe(name):
        def hook(_module, args):
            probes[name] = torch.zeros_like(args[0], requires_grad=True)
            return (args[0] + probes[name], *args[1:])
        return hook

    with ExitStack() as stack:
        for name, module in receivers(model).items():
            stack.callback(module.register_forward_pre_hook(probe(name)).remove)
        yield probes


def run(model, batch, items: list) -> tuple:
    """({sender site or "embeddings": activation}, {receiver: gradient}) of one forward and backward pass."""
    with torch.enable_grad(), receiver_probes(model) as probes, circuits.read_sites(model) as sites, \
            read_states(model, [0]) as states:
        metric = circuits.logit_difference(final_logits(model, batch), items)
        names = list(probes)
        grads = torch.autograd.grad(metric.sum(), [probes[n] for n in names])
    return {**sites, EMBEDDINGS: states[0]}, {n: g.float() for n, g in zip(names, grads)}


def writes(model, delta: dict) -> dict:
    """{sender: its clean - corrupted write to the residual [batch, seq, hidden]} from the activation
    differences {site: tensor}."""
    heads, projections = circuits.n_heads(model), {}
    for site, module in circuits.site_modules(model).items():
        if site[0] == "attn":
            projections[site[1]] = module
    out = {EMBEDDINGS: delta[EMBEDDINGS]}
    for component in circuits.components(model):
        if component.head < 0:
            out[component.name] = delta[component.site]
            continue
        masked = torch.zeros_like(delta[component.site])
        circuits.head_view(masked, heads)[..., component.head, :] = \
            circuits.head_view(delta[component.site], heads)[..., component.head, :]
        projection = projections[component.layer]
        with torch.no_grad():
            out[component.name] = projection(masked) - projection(torch.zeros_like(masked))
    return out


def edge_chunk(model, items: list, pad_id: int) -> dict:
    """{(sender, receiver): summed edge score over a chunk of items}."""
    clean, corrupted = circuits.batches(items, pad_id, next(model.parameters()).device)
    clean_acts, clean_grads = run(model, clean, items)
    corrupted_acts, corrupted_grads = run(model, corrupted, items)
    delta = {site: clean_acts[site].float() - corrupted_acts[site].float() for site in clean_acts}
    scores = {}
    for sender, write in writes(model, delta).items():
        for receiver in clean_grads:
            if reads(sender, receiver):
                slope = (clean_grads[receiver] + corrupted_grads[receiver]) / 2
                scores[(sender, receiver)] = (write.float() * slope).sum().item()
    return scores


def edge_scores(model, items: list, pad_id: int, batch_size: int) -> dict:
    """{(sender, receiver): mean edge score over items}."""
    total = {}
    for chunk in circuits.chunks(items, batch_size):
        for edge, value in edge_chunk(model, chunk, pad_id).items():
            total[edge] = total.get(edge, 0.0) + value / len(items)
    return total


def summarise(scores: dict, effect: float) -> list:
    """Edges by decreasing |score|: {sender, receiver, score, fraction (of the clean - corrupted effect)}."""
    ordered = sorted(scores, key=lambda edge: (-abs(scores[edge]), edge))
    return [{"sender": s, "receiver": r, "score": scores[(s, r)],
             "fraction": scores[(s, r)] / effect if effect else None} for s, r in ordered]


def compare(before: list, after: list, top: int) -> dict:
    """Edge change before vs after a fine-tune: Spearman of the edges' fractions of each model's effect and
    Jaccard of the `top` edges by |score|."""
    fractions = [{(e["sender"], e["receiver"]): e["fraction"] or 0.0 for e in edges} for edges in (before, after)]
    names = sorted(fractions[0])
    return {"spearman": stats.spearman([fractions[0][n] for n in names], [fractions[1][n] for n in names]),
            "jaccard_top": stats.jaccard([(e["sender"], e["receiver"]) for e in before[:top]],
                                         [(e["sender"], e["receiver"]) for e in after[:top]]), "top": top}
