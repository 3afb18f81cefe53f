"""The summary across models: a table and the paper's figure (CoT vs no-CoT per model, sorted)."""
from runner.files import atomic_write_bytes, atomic_write_text
from twohop.data.real_facts import SET_ASIDE
from twohop.plots import COT_FINAL, cot_nocot_bars
from twohop.reports.tables import markdown_table, write_csv

COLUMNS = ("model", "chains", "filtered_n", "nocot", "nocot_se", "cot", "cot_se", "facts_in_context",
           "facts_in_context_se", "set_aside", "set_aside_filtered_n", "set_aside_nocot", "set_aside_cot",
           "nocot_all", "cot_all", "hop_a", "hop_b", "shortcut_e1", "shortcut_no_e1",
           "failed", "not_asked", "input_tokens", "output_tokens", "cost_usd", "graded_by")


def table_row(model: str, s: dict) -> dict:
    head, aside, tasks = s["headline"], s["headline_set_aside"], s["tasks"]
    return {"model": model, "chains": s["chains"], "filtered_n": head["n"],
            "nocot": head["two_hop_nocot"]["accuracy"], "nocot_se": head["two_hop_nocot"]["se"],
            "cot": head["two_hop_cot"]["accuracy"], "cot_se": head["two_hop_cot"]["se"],
            "facts_in_context": head["facts_in_context"]["accuracy"], "facts_in_context_se": head["facts_in_context"]["se"],
            "set_aside": s["set_aside"]["chains"], "set_aside_filtered_n": aside["n"],
            "set_aside_nocot": aside["two_hop_nocot"]["accuracy"], "set_aside_cot": aside["two_hop_cot"]["accuracy"],
            "nocot_all": tasks["two_hop_nocot"]["accuracy"], "cot_all": tasks["two_hop_cot"]["accuracy"],
            "hop_a": tasks["hop_a"]["accuracy"], "hop_b": tasks["hop_b"]["accuracy"],
            "shortcut_e1": tasks["shortcut_e1"]["accuracy"], "shortcut_no_e1": tasks["shortcut_no_e1"]["accuracy"],
            "failed": s["failed"], "not_asked": s["not_asked"], "input_tokens": s["tokens"]["input"],
            "output_tokens": s["tokens"]["output"], "cost_usd": s["cost_usd"], "graded_by": s["graded_by"]}


def set_aside_table(summary: dict) -> list:
    """Per relation pair, the chains and how many each reason sets aside (a property of the data, the same
    for every model)."""
    rows = [{"relation": relation, **counts} for relation, counts in summary["set_aside_per_relation"].items()]
    return ["## Chains set aside, per relation pair", "", *markdown_table(("relation", "chains", *SET_ASIDE), rows)]


def write_summary(summaries: dict, run_dir, title: str) -> None:
    rows = [table_row(model, s) for model, s in summaries.items()]
    write_csv(run_dir / "summary.csv", COLUMNS, rows)
    lines = [f"# {title}", "", "nocot / cot / facts_in_context: accuracy on the chains whose two hops are both "
             "answered right and whose two shortcuts both fail (filtered_n of them), with standard errors, leaving "
             "out the `set_aside` chains (a name gives the answer away, an ambiguous value, a question left a "
             "fragment), whose figures under the same filter are `set_aside_*`; `_all`: on every chain. "
             "`failed`: asked, no answer after the retries; `not_asked`: never asked, "
             "the endpoint being down (no connection could be opened). Tokens and cost count the requests sent "
             "in this run (cached replies are free).",
             "", *markdown_table(COLUMNS, rows), "", *set_aside_table(next(iter(summaries.values())))]
    atomic_write_text(run_dir / "summary.md", "\n".join(lines) + "\n")

    rows.sort(key=lambda r: -1 if r["cot"] is None else -r["cot"])  # None: no chain passed the filter
    col = lambda key: [r[key] for r in rows]  # noqa: E731
    atomic_write_bytes(run_dir / "cot_vs_nocot.png", cot_nocot_bars(
        [f"{r['model']}\n(n={r['filtered_n']})" for r in rows], col("cot"), col("cot_se"), col("nocot"),
        col("nocot_se"), [None] * len(rows), title, COT_FINAL, "two-hop accuracy (filtered chains)", 8,
        30 if len(rows) > 3 else 0, 1.1, 3.8))
