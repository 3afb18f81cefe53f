"""analysis.md and the analysis plots (numbers from analysis.json)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from twohop.reports.tables import fmt  # noqa: E402
from twohop.plots import finish_layer_plot, png  # noqa: E402


def corr_text(c: dict) -> str:
    return "" if c is None else f"{c['rho']:.2f} (p={c['p']:.3f}, n={c['n']})"


def analysis_markdown(analysis: dict, title: str) -> str:
    lines = [f"# {title}", "", f"Entity types: {', '.join(analysis['entity_types'])}. Layer 0 is the embeddings. "
             "Similarity: mean cosine of same-(entity, attribute) states (matched) vs pairs of the same attribute "
             "whose values differ (mismatched). rho: Spearman correlation of the per-attribute similarity "
             "(matched, or matched minus mismatched) with the per-attribute two-hop no-CoT accuracy, "
             "permutation p-value.", ""]
    for pair, result in analysis["pairs"].items():
        has_types = any(row.get("corr_type_means") for row in result["by_layer"])
        lines += [f"## {pair}", "", "| layer | matched | mismatched | rho matched | rho excess |"
                  + (" rho type means |" if has_types else ""), "|---|---|---|---|---|" + ("---|" if has_types else "")]
        for row in result["by_layer"]:
            lines.append(f"| {row['layer']} | {row['matched']:.4f} | {row['mismatched']:.4f} | "
                         f"{corr_text(row['corr_matched'])} | {corr_text(row['corr_excess'])} |"
                         + (f" {corr_text(row.get('corr_type_means'))} |" if has_types else ""))
        lines.append("")
    lens = analysis["logit_lens"]
    lines += ["## Logit lens on two-hop questions", "",
              f"Rank of the bridge entity's first token (0 = top of {lens['vocab']}) when the last-token state "
              f"of each of {lens['n']} two-hop no-CoT questions is decoded at each layer.", "",
              "| layer | median rank | mean rank | top-1 | top-10 |", "|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['median_rank']:.1f} | {r['mean_rank']:.1f} | {fmt(r['top1'])} | {fmt(r['top10'])} |"
              for r in lens["by_layer"]]
    lines += ["", "Per-attribute no-CoT accuracy:", "", "| attribute | accuracy |", "|---|---|"]
    lines += [f"| {key} | {value:.4f} |" for key, value in analysis["accuracy"].items()]
    return "\n".join(lines) + "\n"


def similarity_plot(analysis: dict, title: str) -> bytes:
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    for (pair, result), color in zip(analysis["pairs"].items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        layers = [r["layer"] for r in result["by_layer"]]
        axis.plot(layers, [r["matched"] for r in result["by_layer"]], marker="o", color=color, label=f"{pair}: true pairs")
        axis.plot(layers, [r["mismatched"] for r in result["by_layer"]], linestyle="--", color=color,
                  label=f"{pair}: mismatched")
    return finish_layer_plot(axis, figure, layers, "cosine similarity", title, 6)


def scatter_plot(analysis: dict, title: str) -> bytes:
    pair = next(iter(analysis["pairs"]))
    layer = analysis["scatter_layer"]
    row = analysis["pairs"][pair]["by_layer"][layer]
    keys = list(analysis["accuracy"])
    x = [row["by_attribute"][k]["matched"] for k in keys]
    y = [analysis["accuracy"][k] for k in keys]
    figure, axis = plt.subplots(figsize=(5, 4), dpi=100)
    axis.scatter(x, y)
    for key, xi, yi in zip(keys, x, y):
        axis.annotate(key.split("/")[-1] if len(keys) <= 12 else "", (xi, yi), fontsize=7)
    c = row["corr_matched"]
    axis.set_xlabel(f"{pair} similarity at layer {layer}")
    axis.set_ylabel("two-hop no-CoT accuracy")
    axis.set_title(f"{title}\nSpearman rho {c['rho']:.2f}, permutation p {c['p']:.3f}, n={c['n']}", fontsize=9)
    return png(figure)


def logit_lens_plot(ranks: np.ndarray, title: str) -> bytes:
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    layers = np.arange(len(ranks))
    low, median, high = (np.percentile(ranks, q, axis=1) for q in (25, 50, 75))
    axis.plot(layers, median + 1, marker="o", label="median")
    axis.fill_between(layers, low + 1, high + 1, alpha=0.3, label="25-75th percentile")
    axis.set_yscale("log")
    return finish_layer_plot(axis, figure, layers, "rank of the bridge token + 1", title, 8)
