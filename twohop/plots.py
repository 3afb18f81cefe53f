"""The study's figures, drawn once: CoT / no-CoT / chance bars and per-layer curves, as PNG bytes."""
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COT_COLOR, NOCOT_COLOR = "#4c72b0", "#dd8452"
# What "CoT accuracy" means in a figure: say it in the legend, always.
COT_FINAL = "CoT (final answer)"
COT_CHAIN = "CoT (answer stated in the chain)"


def png(figure) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def cot_nocot_bars(labels, cot, cot_se, nocot, nocot_se, chance, title: str, cot_label: str,
                   ylabel: str = "accuracy", label_size: int = 9, rotation: int = 0, width_per_bar: float = 1.4,
                   height: float = 3.5, dpi: int = 100) -> bytes:
    """Per group: CoT and no-CoT accuracy with s.e. bars (None draws as 0) and a dashed chance line
    (None: no line). `cot_label` says which CoT accuracy it is (COT_FINAL or COT_CHAIN)."""
    zero = lambda values: [v or 0 for v in values]  # noqa: E731
    figure, axis = plt.subplots(figsize=(max(4, width_per_bar * len(labels) + 2), height), dpi=dpi)
    x = list(range(len(labels)))
    axis.bar([i - 0.2 for i in x], zero(cot), 0.4, yerr=zero(cot_se), capsize=3, label=cot_label, color=COT_COLOR)
    axis.bar([i + 0.2 for i in x], zero(nocot), 0.4, yerr=zero(nocot_se), capsize=3, label="no-CoT", color=NOCOT_COLOR)
    lines = [(i, level) for i, level in zip(x, chance) if level is not None]
    if lines:
        axis.hlines([level for _, level in lines], [i - 0.45 for i, _ in lines], [i + 0.45 for i, _ in lines],
                    colors="black", linestyles="dashed", label="chance")
    axis.set_xticks(x, labels, rotation=rotation, ha="right" if rotation else "center", fontsize=label_size)
    axis.set_ylim(0, 1)
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)
    return png(figure)


def finish_layer_plot(axis, figure, layers, ylabel: str, title: str, legend_size: int = 8) -> bytes:
    """The common finish of a per-layer figure: integer layer ticks (0 = embeddings), labels, legend."""
    axis.set_xticks(list(layers))
    axis.set_xlabel("layer (0 = embeddings)")
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=legend_size)
    return png(figure)
