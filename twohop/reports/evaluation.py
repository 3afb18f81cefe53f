"""summary.md, summary.csv and plots for evaluation runs (numbers read from results.json), the
summary over seeds, and the semi-synthetic table across entity types."""
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from runner.files import atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: E402
from twohop.plots import COT_CHAIN, cot_nocot_bars, png  # noqa: E402
from twohop.reports.tables import fmt, markdown_table, write_csv  # noqa: E402
from twohop.stats import over_runs  # noqa: E402

COLUMNS = ("test", "kind", "style", "n", "correct", "correct_se", "strict", "chain_correct", "first_hop", "valid_cot",
           "candidate_accuracy", "chance")


# The bridge's grades, not applicable (n/a) to a test whose rows name no bridge.
BRIDGE_GRADES = ("strict", "first_hop", "valid_cot")


def cell(key: str, value) -> str:
    return "n/a" if value is None and key in BRIDGE_GRADES else fmt(value)


def write_reports(report: dict, run_dir, title: str, training_metrics=None) -> None:
    """summary.csv, summary.md, accuracy.png and, given the finetune run's metrics.jsonl, loss_over_training.png."""
    rows = [{"test": test, **summary} for test, summary in report["tests"].items()]
    write_csv(run_dir / "summary.csv", COLUMNS, rows, cell)
    lines = [f"# {title}", "", f"Model: `{report['model']}`", "", *markdown_table(COLUMNS, rows, cell)]
    if report["loss_gaps"]:
        lines += ["", "Loss gap (shuffled minus true answers; > 0 means the no-CoT output carries information):", "",
                  "| test | loss true | loss shuffled | gap | 95% CI | n |", "|---|---|---|---|---|---|"]
        lines += [f"| {t} | {g['loss_true']:.4f} | {g['loss_shuffled']:.4f} | {g['gap']:.4f} | "
                  f"[{g['ci95'][0]:.4f}, {g['ci95'][1]:.4f}] | {g['n']} |" for t, g in report["loss_gaps"].items()]
    atomic_write_text(run_dir / "summary.md", "\n".join(lines) + "\n")
    atomic_write_bytes(run_dir / "accuracy.png", accuracy_plot(report, title))
    if training_metrics and training_metrics.is_file():
        evals = [json.loads(line) for line in training_metrics.read_text().splitlines() if '"eval"' in line]
        if any(key.endswith("/loss_gap") for entry in evals for key in entry):
            atomic_write_bytes(run_dir / "loss_over_training.png", loss_plot(evals, title))


def loss_plot(evals: list, title: str) -> bytes:
    """Loss on true vs shuffled answers at each evaluation during fine-tuning (the gap's history)."""
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    for key in sorted({k for entry in evals for k in entry if k.endswith("/loss_gap")}):
        name = key[:-len("/loss_gap")]
        steps, true, gap = zip(*[(e["step"], e[f"{name}/loss"], e[key]) for e in evals if key in e])
        axis.plot(steps, true, marker="o", label=f"{name}: true answers")
        axis.plot(steps, [t + g for t, g in zip(true, gap)], marker="x", linestyle="--", label=f"{name}: shuffled answers")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss per answer token")
    axis.set_title(title)
    axis.legend(fontsize=8)
    return png(figure)


# Kinds drawn as CoT vs no-CoT: two-hop tests, and given files whose rows name no bridge (the reference's
# semi-synthetic tests among them).
PLOTTED_KINDS = ("two_hop", "atomic")


def two_hop_pairs(tests: dict) -> list:
    """(label, no-CoT summary, CoT summary or {}) per two-hop group (an attribute, or the one two-hop test)."""
    cot = {s["attribute"]: s for s in tests.values() if s.get("kind") in PLOTTED_KINDS and s["style"] == "cot"}
    return [(s["attribute"] or "two-hop", s, cot.get(s["attribute"], {})) for s in tests.values()
            if s.get("kind") in PLOTTED_KINDS and s["style"] == "nocot"]


def accuracy_plot(report: dict, title: str) -> bytes:
    """CoT (answer stated in the chain) vs no-CoT accuracy with standard-error bars and chance, per two-hop test."""
    pairs = two_hop_pairs(report["tests"])
    return cot_nocot_bars([label for label, _, _ in pairs], [c.get("chain_correct", 0) for _, _, c in pairs],
                          [c.get("chain_correct_se", 0) for _, _, c in pairs], [n.get("correct") for _, n, _ in pairs],
                          [n.get("correct_se") for _, n, _ in pairs], [n.get("chance") for _, n, _ in pairs], title,
                          COT_CHAIN, rotation=30 if len(pairs) > 3 else 0)


def write_seeds_summary(headlines: dict, run_dir, title: str) -> dict:
    """Every headline metric over seeds ({seed: headline}): mean, s.e. and the values, into
    seeds_summary.{json,md} of `run_dir`."""
    metrics = sorted({k for headline in headlines.values() for k in headline})
    summary = {metric: over_runs([h[metric] for h in headlines.values() if metric in h]) for metric in metrics}
    atomic_write_json(run_dir / "seeds_summary.json", {"seeds": sorted(headlines), "metrics": summary})
    lines = [f"# {title}: mean +- s.e. over seeds {', '.join(map(str, sorted(headlines)))}", "",
             "| metric | mean | s.e. | seeds |", "|---|---|---|---|"]
    lines += [f"| {m} | {s['mean']:.4f} | {fmt(s['se'])} | {s['n']} |" for m, s in summary.items()]
    atomic_write_text(run_dir / "seeds_summary.md", "\n".join(lines) + "\n")
    return {f"{m}/mean": s["mean"] for m, s in summary.items()}


def by_kind(tests: dict, kind: str, attribute: str = None) -> dict:
    """The summary of the (first) test of a kind, and of an attribute if given; {} if there is none."""
    return next((s for s in tests.values() if s.get("kind") == kind and attribute in (None, s.get("attribute"))), {})


def semi_synthetic_rows(results_by_type: dict) -> list:
    """One row per (entity type, attribute): no-CoT and CoT (answer stated in the chain) two-hop accuracy,
    the natural fact (hop B) and the first hop, with n and chance; sorted by no-CoT accuracy, best first."""
    rows = []
    for entity_type, results in results_by_type.items():
        tests = results["tests"]
        for test, nocot in tests.items():
            if nocot.get("kind") != "two_hop" or nocot["style"] != "nocot":
                continue
            attribute = nocot["attribute"]
            cot = next((s for s in tests.values() if s.get("kind") == "two_hop" and s["style"] == "cot"
                        and s["attribute"] == attribute), {})
            hop_b, first_hop = by_kind(tests, "hop_b", attribute).get("correct"), by_kind(tests, "hop_a").get("correct")
            rows.append({"entity_type": entity_type, "attribute": attribute, "n": nocot["n"],
                         "nocot": nocot.get("correct"), "nocot_se": nocot.get("correct_se"),
                         "shortcut_n": nocot.get("shortcut", {}).get("n", 0),
                         "shortcut_nocot": nocot.get("shortcut", {}).get("correct"),
                         "premise": premise_holds(hop_b, first_hop),
                         "cot_chain": cot.get("chain_correct"), "cot_chain_se": cot.get("chain_correct_se"),
                         "hop_b": hop_b, "hop_b_before": by_kind(results.get("before", {}), "hop_b", attribute).get("correct"),
                         "first_hop": first_hop, "chance": nocot.get("chance"), "majority": nocot.get("majority"),
                         "loss_gap": results["loss_gaps"].get(test, {}).get("gap")})
    return sorted(rows, key=lambda r: -(r["nocot"] or 0))


# A semi-synthetic test measures composition only where both hops are there to compose.
HOP_B_KNOWN, FIRST_HOP_LEARNED = 0.5, 0.9


def premise_holds(hop_b, first_hop) -> bool:
    """Hop B is known (>= 50% asked directly) and the first hop learned (>= 90% on held-out phrasings)."""
    return hop_b is not None and first_hop is not None and hop_b >= HOP_B_KNOWN and first_hop >= FIRST_HOP_LEARNED


SEMI_COLUMNS = ("entity_type", "attribute", "n", "nocot", "nocot_se", "cot_chain", "cot_chain_se", "hop_b",
                "hop_b_before", "first_hop", "premise", "chance", "majority", "loss_gap", "shortcut_n", "shortcut_nocot")


def write_semi_synthetic_report(results_by_type: dict, run_dir, title: str) -> dict:
    rows = semi_synthetic_rows(results_by_type)
    write_csv(run_dir / "summary.csv", SEMI_COLUMNS, rows)
    lines = [f"# {title}", "", "Two-hop accuracy per entity type and attribute, sorted by no-CoT accuracy "
             "(cot_chain: the answer the chain of thought states; hop_b: the natural fact asked directly, after "
             "and (hop_b_before) before the fine-tune; "
             "first_hop: the fictional person's favorite entity; chance: 1/|candidates|; majority: the score of "
             "answering every question with the commonest answer; premise: hop_b >= 50% and first_hop >= 90%, "
             "without which no-CoT cannot measure composition; n excludes the shortcut_n questions whose "
             "answer is in the entity's name, scored apart as shortcut_nocot).", "",
             *markdown_table(SEMI_COLUMNS, rows)]
    atomic_write_text(run_dir / "summary.md", "\n".join(lines) + "\n")
    col = lambda key: [r[key] for r in rows]  # noqa: E731
    atomic_write_bytes(run_dir / "accuracy_by_type.png", cot_nocot_bars(
        [f"{r['entity_type']}/{r['attribute']}" for r in rows], col("cot_chain"), col("cot_chain_se"), col("nocot"),
        col("nocot_se"), col("chance"), title, COT_CHAIN, label_size=7, rotation=75, width_per_bar=0.35, height=4))
    mean = lambda key: sum(r[key] or 0 for r in rows) / len(rows) if rows else float("nan")  # noqa: E731
    return {"types": len(results_by_type), "attributes": len(rows), "mean_nocot": mean("nocot"),
            "mean_cot_chain": mean("cot_chain"), "mean_hop_b": mean("hop_b")}
