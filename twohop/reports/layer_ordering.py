"""Tables and plots of a stage chain: each metric by stage, per chain and both chains side by side."""
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from runner.errors import UserError  # noqa: E402
from runner.files import atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: E402
from twohop.reports.tables import fmt, markdown_table, write_csv  # noqa: E402
from twohop.plots import png  # noqa: E402

METRICS = {"acc_a": "hop A (held-out)", "acc_b": "hop B (held-out)", "acc_2hop_cot_chain": "two-hop CoT (answer stated in the chain)",
           "acc_2hop_nocot": "two-hop no-CoT", "loss_gap": "loss gap (shuffled - true)"}
COLUMNS = ("stage", "name", "layer_range", "lr", "steps", "train_seconds", *METRICS, "chance")


def cell(key: str, value) -> str:
    if key == "lr":
        return f"{value:.3g}"
    if key == "train_seconds":
        return f"{value:.1f}"
    return fmt(value)


def table_rows(records: list) -> list:
    return [{**{k: r[k] for k in COLUMNS[:6]}, **{m: r["metrics"].get(m) for m in (*METRICS, "chance")}} for r in records]


def write_chain_report(records: list, run_dir, title: str) -> None:
    rows = table_rows(records)
    write_csv(run_dir / "summary.csv", COLUMNS, rows, cell)
    lines = [f"# {title}", "", "Metrics after each stage (held-out atomic facts, undemoed two-hop questions; CoT: "
             "the answer the chain states).", "", *markdown_table(COLUMNS, rows, cell)]
    atomic_write_text(run_dir / "summary.md", "\n".join(lines) + "\n")
    atomic_write_bytes(run_dir / "metrics_by_stage.png", plot({title: records}, title))


def plot(chains: dict, title: str) -> bytes:
    """One panel per metric; one line per chain; x = stage."""
    figure, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.4), dpi=100, squeeze=False)
    for axis, (metric, label) in zip(axes[0], METRICS.items()):
        for (name, records), marker in zip(chains.items(), "os^D"):
            x = [r["stage"] for r in records]
            axis.plot(x, [r["metrics"].get(metric, float("nan")) for r in records], marker=marker, label=name)
        if metric.startswith("acc_2hop_nocot") and records and "chance" in records[0]["metrics"]:
            axis.axhline(records[0]["metrics"]["chance"], color="black", linestyle="--", label="chance")
        if metric == "loss_gap":
            axis.axhline(0, color="grey", linewidth=0.8)
        else:
            axis.set_ylim(0, 1)
        axis.set_xticks(x, [r["name"].replace("_", "\n") for r in records], fontsize=6)
        axis.set_title(label, fontsize=9)
    axes[0][0].legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    return png(figure)


def write_comparison(chain_dirs: dict, run_dir, title: str) -> dict:
    """Both chains' stage metrics in one table and one figure."""
    chains = {}
    for mode, folder in chain_dirs.items():
        path = folder / "stages.json"
        if not path.is_file():
            raise UserError(f"{path} is missing: run layer_ordering_{mode} first")
        chains[mode] = json.loads(path.read_text())
    rows = [{"mode": mode, **row} for mode, records in chains.items() for row in table_rows(records)]
    lines = [f"# {title}", "", *markdown_table(("mode", *COLUMNS), rows, cell)]
    atomic_write_text(run_dir / "summary.md", "\n".join(lines) + "\n")
    atomic_write_bytes(run_dir / "metrics_by_stage.png", plot(chains, title))
    final = {mode: records[-1]["metrics"] for mode, records in chains.items()}
    atomic_write_json(run_dir / "comparison.json", {"chains": chains, "final": final})
    return {f"{metric}_{mode}": final[mode].get(metric) for mode in chains for metric in METRICS}
