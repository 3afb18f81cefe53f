"""Reports of the circuit-discovery sub-jobs: summary.md and the figures (PNG bytes).

`results` is the job's results.json: {"models": {label: path}, "tasks": {task: {label: discovery}},
"comparison": {task: compare(...)}, ...}, a discovery as `twohop.interp.circuits.discover` returns it.
"""
import numpy as np

from twohop.plots import png, plt


def _number(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fraction(found: dict, name: str, key: str) -> str:
    value = found[key].get(name)
    return "n/a" if value is None or not found["effect"] else f"{value / found['effect']:.2f}"


def _task_lines(task: str, by_model: dict) -> list:
    lines = [f"## {task}", "", "| model | items | clean | corrupted | accuracy | corrupted accuracy | top components "
             "(exact patching, fraction of the effect) | attribution vs exact (Spearman) | faithfulness of the top "
             "set | accuracy, top set ablated |", "|---" * 10 + "|"]
    for label, found in by_model.items():
        top = ", ".join(f"{n} ({_fraction(found, n, 'exact')})" for n in found["top"])
        at_k = {p["k"]: p for p in found["curve"]}[len(found["top"])]
        ablated = found["accuracy"][f"top_{len(found['top'])}"]
        lines.append(f"| {label} | {found['n']} | {found['clean']:.2f} | {found['corrupted']:.2f} | "
                     f"{found['accuracy']['none']:.2f} | {found['corrupted_accuracy']:.2f} | {top} | "
                     f"{_number(found['attribution_vs_exact_spearman'])} | {_number(at_k['faithfulness'])} | "
                     f"{ablated:.2f} |")
    extra = [(label, name, value) for label, found in by_model.items()
             for name, value in found["accuracy"].items() if name != "none" and not name.startswith("top_")]
    if extra:
        lines += ["", "| model | mean-ablated | accuracy |", "|---|---|---|"]
        lines += [f"| {label} | {name} | {value:.2f} |" for label, name, value in extra]
    for label, found in by_model.items():
        if found.get("top_edges"):
            lines += ["", f"Top edges ({label}; EAP score as a fraction of the effect): " + ", ".join(
                f"{e['sender']} -> {e['receiver']} ({_number(e['fraction'])})" for e in found["top_edges"])]
    return lines + [""]


def _comparison_lines(comparison: dict) -> list:
    lines = ["## Before vs after the fine-tune", "", "| task | top before | top after | Jaccard of the top k "
             "(k = 1, 2, ...) | Spearman of attribution scores | edges: Spearman, Jaccard of the top | accuracy "
             "before | after |", "|---" * 8 + "|"]
    for task, c in comparison.items():
        jaccard = ", ".join(_number(v) for v in c["jaccard"].values())
        edge = c.get("edges")
        edges = f"{_number(edge['spearman'])}, {_number(edge['jaccard_top'])} (top {edge['top']})" if edge else "n/a"
        lines.append(f"| {task} | {', '.join(c['top_before'])} | {', '.join(c['top_after'])} | {jaccard} | "
                     f"{_number(c['spearman_attribution'])} | {edges} | {c['accuracy_before']:.2f} | "
                     f"{c['accuracy_after']:.2f} |")
    return lines + [""]


def markdown(results: dict, label: str) -> str:
    """The headline tables: per task and model, the effect, top components and the checks; then the
    before-vs-after comparison where there is one."""
    lines = [f"# Circuit discovery: {label}", "", "Models: " + ", ".join(f"{k} `{v}`" for k, v in
                                                                         results["models"].items()), "",
             "Metric: logit(answer) - logit(foil) at the last prompt token, clean vs corrupted prompt (means over "
             "items). Components: attention heads (output before the output projection) and MLPs. Scores: "
             "attribution patching (gradient x activation difference, gradients of the clean and the corrupted run "
             "averaged) and exact patching (one component's clean activation written into the corrupted run), as a "
             "fraction of the clean - corrupted effect. Faithfulness: the clean and the corrupted run with everything "
             "outside the top set mean-ablated (means over the corrupted prompts): the share of the clean - corrupted "
             "difference that remains. "
             "Accuracy: the share of items whose answer beats its foil (ties half; chance 0.5).", ""]
    for task, by_model in results["tasks"].items():
        lines += _task_lines(task, by_model)
    if results.get("comparison"):
        lines += _comparison_lines(results["comparison"])
    lines += ["Edges (EAP): senders are the embeddings, heads and MLPs; receivers each layer's attention (its heads "
              "together), each MLP and the logits; score = the sender's clean - corrupted write . the metric's "
              "gradient at the receiver's input (clean and corrupted averaged). scores.jsonl and edges.jsonl hold "
              "every component and edge.", "",
              f"Parity check (every component's own output written back; largest logit difference): "
              f"{results['parity']}", "", "Seconds per task and model: " +
              ", ".join(f"{t}/{m} {s:.0f}" for t, by in results["seconds"].items() for m, s in by.items()), ""]
    return "\n".join(lines)


def _grid(found: dict, layers: int, heads: int) -> np.ndarray:
    """Each component's score (exact patching where checked, else attribution) as a fraction of the effect,
    layers (rows) x heads and the MLP (last column)."""
    grid = np.full((layers, heads + 1), np.nan)
    effect = found["effect"] or 1.0
    for name, attribution in found["attribution"].items():
        value = found["exact"].get(name, attribution)
        layer, part = name[1:].split(".")
        grid[int(layer) - 1, heads if part == "MLP" else int(part[1:])] = value / effect
    return grid


def heat_maps(results: dict, layers: int, heads: int, title: str) -> bytes:
    """Per task (rows) and model (columns, side by side): scores per layer x head (+ MLP column)."""
    tasks, models = list(results["tasks"]), list(results["models"])
    size = (max(3.5, 0.5 * heads + 2) * len(models), max(2.5, 0.35 * layers + 1.5) * len(tasks))
    figure, axes = plt.subplots(len(tasks), len(models), squeeze=False, dpi=100, figsize=size)
    for row, task in enumerate(tasks):
        for column, model in enumerate(models):
            axis, grid = axes[row][column], _grid(results["tasks"][task][model], layers, heads)
            bound = max(np.nanmax(np.abs(grid)), 1e-9)
            image = axis.imshow(grid, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto",
                                extent=(-0.5, heads + 0.5, layers + 0.5, 0.5))
            axis.set_xticks(range(heads + 1), [str(h) for h in range(heads)] + ["MLP"], fontsize=7)
            axis.set_yticks(range(1, layers + 1))
            axis.set_xlabel("head")
            axis.set_ylabel("layer")
            axis.set_title(f"{task}: {model}", fontsize=9)
            figure.colorbar(image, ax=axis, fraction=0.05, label="score / effect")
    figure.suptitle(f"{title}\nexact patching where checked, else attribution; fraction of the clean - corrupted "
                    "effect", fontsize=9)
    return png(figure)


def overlap_plot(comparison: dict, title: str) -> bytes:
    """Jaccard of the before and after top-k sets against k, one line per task."""
    figure, axis = plt.subplots(figsize=(5, 3.5), dpi=100)
    for task, c in comparison.items():
        ks = [int(k) for k in c["jaccard"]]
        axis.plot(ks, [v if v is not None else np.nan for v in c["jaccard"].values()], marker="o",
                  label=f"{task} (Spearman {_number(c['spearman_attribution'])})")
    axis.set_ylim(-0.05, 1.05)
    axis.set_xticks(ks)
    axis.set_xlabel("k (top components)")
    axis.set_ylabel("Jaccard, before vs after")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)
    return png(figure)


def faithfulness_plot(results: dict, title: str) -> bytes:
    """Faithfulness of the top-k set (everything else mean-ablated) against k, per task and model."""
    figure, axis = plt.subplots(figsize=(6, 4), dpi=100)
    for task, by_model in results["tasks"].items():
        for model, found in by_model.items():
            curve = [p for p in found["curve"] if p["faithfulness"] is not None]
            axis.plot([p["k"] for p in curve], [p["faithfulness"] for p in curve], marker="o", label=f"{task}: {model}")
    axis.axhline(1.0, color="black", linestyle="dashed", linewidth=0.8)
    sizes = sorted({p["k"] for by in results["tasks"].values() for found in by.values() for p in found["curve"]})
    if sizes[-1] > 20:
        axis.set_xscale("symlog", linthresh=10)
    else:
        axis.set_xticks(sizes)
    axis.set_xlabel("k (top components kept; the rest mean-ablated)")
    axis.set_ylabel("faithfulness")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=7)
    return png(figure)
