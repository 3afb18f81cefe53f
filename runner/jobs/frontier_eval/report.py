"""The summary across models: a table and the paper's figure (CoT vs no-CoT per model, sorted)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from runner.files import atomic_write_bytes, atomic_write_text  # noqa: E402
from runner.jobs.evaluate_twohop.report import markdown_table, png, write_csv  # noqa: E402

COLUMNS = ("model", "chains", "filtered_n", "nocot", "nocot_se", "cot", "cot_se", "facts_in_context",
           "facts_in_context_se", "nocot_all", "cot_all", "hop_a", "hop_b", "shortcut_e1", "shortcut_no_e1",
           "failed", "input_tokens", "output_tokens", "cost_usd", "graded_by")


def table_row(model: str, s: dict) -> dict:
    head, tasks = s["headline"], s["tasks"]
    return {"model": model, "chains": s["chains"], "filtered_n": head["n"],
            "nocot": head["two_hop_nocot"]["accuracy"], "nocot_se": head["two_hop_nocot"]["se"],
            "cot": head["two_hop_cot"]["accuracy"], "cot_se": head["two_hop_cot"]["se"],
            "facts_in_context": head["facts_in_context"]["accuracy"], "facts_in_context_se": head["facts_in_context"]["se"],
            "nocot_all": tasks["two_hop_nocot"]["accuracy"], "cot_all": tasks["two_hop_cot"]["accuracy"],
            "hop_a": tasks["hop_a"]["accuracy"], "hop_b": tasks["hop_b"]["accuracy"],
            "shortcut_e1": tasks["shortcut_e1"]["accuracy"], "shortcut_no_e1": tasks["shortcut_no_e1"]["accuracy"],
            "failed": s["failed"], "input_tokens": s["tokens"]["input"], "output_tokens": s["tokens"]["output"],
            "cost_usd": s["cost_usd"], "graded_by": s["graded_by"]}


def write_summary(summaries: dict, run_dir, title: str) -> None:
    rows = [table_row(model, s) for model, s in summaries.items()]
    write_csv(run_dir / "summary.csv", COLUMNS, rows)
    lines = [f"# {title}", "", "nocot / cot / facts_in_context: accuracy on the chains whose two hops are both "
             "answered right and whose two shortcuts both fail (filtered_n of them), with standard errors; "
             "`_all`: on every chain. Tokens and cost count the requests sent in this run (cached replies are free).",
             "", *markdown_table(COLUMNS, rows)]
    atomic_write_text(run_dir / "summary.md", "\n".join(lines) + "\n")

    rows.sort(key=lambda r: -1 if r["cot"] is None else -r["cot"])
    figure, axis = plt.subplots(figsize=(max(4, 1.1 * len(rows) + 2), 3.8), dpi=100)
    x = range(len(rows))
    zero = lambda v: v or 0  # noqa: E731  (None: no chain passed the filter)
    axis.bar([i - 0.2 for i in x], [zero(r["cot"]) for r in rows], 0.4, yerr=[zero(r["cot_se"]) for r in rows],
             label="CoT", color="#4c72b0")
    axis.bar([i + 0.2 for i in x], [zero(r["nocot"]) for r in rows], 0.4, yerr=[zero(r["nocot_se"]) for r in rows],
             label="no-CoT", color="#dd8452")
    axis.set_xticks(list(x), [f"{r['model']}\n(n={r['filtered_n']})" for r in rows], rotation=30 if len(rows) > 3 else 0,
                    ha="right" if len(rows) > 3 else "center", fontsize=8)
    axis.set_ylim(0, 1)
    axis.set_ylabel("two-hop accuracy (filtered chains)")
    axis.set_title(title)
    axis.legend(fontsize=8)
    atomic_write_bytes(run_dir / "cot_vs_nocot.png", png(figure))
