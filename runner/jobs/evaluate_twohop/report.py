"""summary.md, summary.csv and plots for one evaluation run (numbers read from results.json)."""
import csv
import io
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from runner.files import atomic_write_bytes, atomic_write_text  # noqa: E402

COLUMNS = ("test", "style", "n", "correct", "correct_se", "strict", "chain_correct", "first_hop", "valid_cot",
           "candidate_accuracy", "chance")


def fmt(value) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def write_csv(path, columns, rows, cell=lambda key, value: fmt(value)) -> None:
    """`rows` (dicts) as a CSV of `columns`, each value written by `cell(column, value)`."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: cell(k, row.get(k)) for k in columns} for row in rows)
    atomic_write_text(path, buffer.getvalue())


def markdown_table(columns, rows, cell=lambda key, value: fmt(value)) -> list:
    return (["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(cell(k, row.get(k)) for k in columns) + " |" for row in rows])


def write_reports(report: dict, run_dir, title: str, training_metrics=None) -> None:
    """summary.csv, summary.md, accuracy.png and, given the finetune run's metrics.jsonl, loss_over_training.png."""
    rows = [{"test": test, **summary} for test, summary in report["tests"].items()]
    write_csv(run_dir / "summary.csv", COLUMNS, rows)
    lines = [f"# {title}", "", f"Model: `{report['model']}`", "", *markdown_table(COLUMNS, rows)]
    if report["loss_gaps"]:
        lines += ["", "Loss gap (shuffled minus true answers; > 0 means the no-CoT output carries information):", "",
                  "| test | loss true | loss shuffled | gap | 95% CI | n |", "|---|---|---|---|---|---|"]
        lines += [f"| {t} | {g['loss_true']:.4f} | {g['loss_shuffled']:.4f} | {g['gap']:.4f} | "
                  f"[{g['ci95'][0]:.4f}, {g['ci95'][1]:.4f}] | {g['n']} |" for t, g in report["loss_gaps"].items()]
    atomic_write_text(run_dir / "summary.md", "\n".join(lines) + "\n")
    atomic_write_bytes(run_dir / "accuracy.png", accuracy_plot(report, title))
    if training_metrics and training_metrics.is_file():
        evals = [json.loads(line) for line in training_metrics.read_text().splitlines() if '"eval"' in line]
        if any(key.endswith("_shuffled/loss") for entry in evals for key in entry):
            atomic_write_bytes(run_dir / "loss_over_training.png", loss_plot(evals, title))


def png(figure) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def loss_plot(evals: list, title: str) -> bytes:
    """Loss on true vs shuffled answers at each evaluation during fine-tuning (the gap's history)."""
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    for key in sorted({k for entry in evals for k in entry if k.endswith("_shuffled/loss")}):
        true_key = key.replace("_shuffled/loss", "/loss")
        points = [(e["step"], e[true_key], e[key]) for e in evals if key in e and true_key in e]
        steps, true, shuffled = zip(*points)
        name = true_key[:-len("/loss")]
        axis.plot(steps, true, marker="o", label=f"{name}: true answers")
        axis.plot(steps, shuffled, marker="x", linestyle="--", label=f"{name}: shuffled answers")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss per answer token")
    axis.set_title(title)
    axis.legend(fontsize=8)
    return png(figure)


def accuracy_plot(report: dict, title: str) -> bytes:
    """CoT vs no-CoT accuracy with standard-error bars and the chance level, per two-hop test."""
    pairs = [(t[:-len("_nocot")], t) for t in report["tests"] if t.endswith("_nocot")]
    labels, nocot, cot, nocot_se, cot_se, chance = [], [], [], [], [], []
    for stem, nocot_test in pairs:
        cot_test = stem + "_cot"
        n, c = report["tests"][nocot_test], report["tests"].get(cot_test, {})
        labels.append(stem.split("/")[-1])
        nocot.append(n["correct"]), nocot_se.append(n["correct_se"]), chance.append(n.get("chance", 0))
        cot.append(c.get("chain_correct", c.get("correct", 0))), cot_se.append(c.get("chain_correct_se", 0))
    figure, axis = plt.subplots(figsize=(max(4, 1.4 * len(labels) + 2), 3.5), dpi=100)
    x = range(len(labels))
    axis.bar([i - 0.2 for i in x], cot, 0.4, yerr=cot_se, label="CoT (answer stated in the chain)", color="#4c72b0")
    axis.bar([i + 0.2 for i in x], nocot, 0.4, yerr=nocot_se, label="no-CoT", color="#dd8452")
    for i, level in zip(x, chance):
        axis.hlines(level, i - 0.45, i + 0.45, colors="black", linestyles="dashed", label="chance" if i == 0 else None)
    axis.set_xticks(list(x), labels, rotation=30 if len(labels) > 3 else 0, ha="right" if len(labels) > 3 else "center")
    axis.set_ylim(0, 1)
    axis.set_ylabel("accuracy")
    axis.set_title(title)
    axis.legend(fontsize=8)
    return png(figure)


def write_seed_summary(model_dir) -> dict:
    """Headline metrics over every finished seed of one (sub-job, model): mean and standard error.

    Each seed's run rewrites `seeds_summary.{json,md}` next to the `seed_*` folders, so after the
    last seed finishes it covers them all.
    """
    per_seed = {}
    for results in sorted(model_dir.glob("seed_*/results.json")):
        status = results.parent / "status.json"
        if status.is_file() and json.loads(status.read_text()).get("state") in ("done", "running"):
            per_seed[results.parent.name] = json.loads(results.read_text())["headline"]
    metrics = sorted({k for headline in per_seed.values() for k in headline})
    summary = {}
    for metric in metrics:
        values = [h[metric] for h in per_seed.values() if metric in h]
        mean = sum(values) / len(values)
        se = (sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5 if len(values) > 1 else None
        summary[metric] = {"mean": mean, "se": se, "n_seeds": len(values), "values": values}
    atomic_write_text(model_dir / "seeds_summary.json", json.dumps({"seeds": sorted(per_seed), "metrics": summary}, indent=2))
    lines = [f"# {model_dir.parent.name} [{model_dir.name}]: mean +- s.e. over seeds {', '.join(sorted(per_seed))}", "",
             "| metric | mean | s.e. | seeds |", "|---|---|---|---|"]
    lines += [f"| {m} | {s['mean']:.4f} | {fmt(s['se'])} | {s['n_seeds']} |" for m, s in summary.items()]
    atomic_write_text(model_dir / "seeds_summary.md", "\n".join(lines) + "\n")
    return summary


def semi_synthetic_rows(results_by_type: dict) -> list:
    """One row per (entity type, attribute): no-CoT and CoT two-hop accuracy, the natural fact (hop B)
    and the first hop, with n and chance; sorted by no-CoT accuracy, best first, as in the reference."""
    rows = []
    for entity_type, results in results_by_type.items():
        tests = results["tests"]
        for test, nocot in tests.items():
            if not (test.startswith("test/") and test.endswith("_nocot")):
                continue
            attribute = test[len("test/"):-len("_nocot")]
            cot, hop_b, hop_a = tests.get(f"test/{attribute}_cot", {}), tests.get(f"test/b_{attribute}", {}), tests.get("test/first_hop", {})
            rows.append({"entity_type": entity_type, "attribute": attribute, "n": nocot["n"],
                         "nocot": nocot["correct"], "nocot_se": nocot["correct_se"],
                         "cot": cot.get("chain_correct", cot.get("correct")), "cot_se": cot.get("chain_correct_se", cot.get("correct_se")),
                         "hop_b": hop_b.get("correct"), "first_hop": hop_a.get("correct"), "chance": nocot.get("chance"),
                         "loss_gap": results["loss_gaps"].get(test, {}).get("gap")})
    return sorted(rows, key=lambda r: -r["nocot"])


SEMI_COLUMNS = ("entity_type", "attribute", "n", "nocot", "nocot_se", "cot", "cot_se", "hop_b", "first_hop", "chance",
                "loss_gap")


def write_semi_synthetic_report(results_by_type: dict, run_dir, title: str) -> dict:
    rows = semi_synthetic_rows(results_by_type)
    write_csv(run_dir / "summary.csv", SEMI_COLUMNS, rows)
    lines = [f"# {title}", "", "Two-hop accuracy per entity type and attribute, sorted by no-CoT accuracy "
             "(hop_b: the natural fact asked directly; first_hop: the fictional person's favorite entity).", "",
             *markdown_table(SEMI_COLUMNS, rows)]
    atomic_write_text(run_dir / "summary.md", "\n".join(lines) + "\n")

    figure, axis = plt.subplots(figsize=(max(6, 0.35 * len(rows) + 2), 4), dpi=100)
    x = range(len(rows))
    axis.bar([i - 0.2 for i in x], [r["cot"] or 0 for r in rows], 0.4, yerr=[r["cot_se"] or 0 for r in rows],
             label="CoT (answer stated in the chain)", color="#4c72b0")
    axis.bar([i + 0.2 for i in x], [r["nocot"] for r in rows], 0.4, yerr=[r["nocot_se"] for r in rows],
             label="no-CoT", color="#dd8452")
    axis.scatter(list(x), [r["chance"] or 0 for r in rows], marker="_", s=120, color="black", label="chance", zorder=3)
    axis.set_xticks(list(x), [f"{r['entity_type']}/{r['attribute']}" for r in rows], rotation=75, ha="right", fontsize=7)
    axis.set_ylim(0, 1)
    axis.set_ylabel("accuracy")
    axis.set_title(title)
    axis.legend(fontsize=8)
    atomic_write_bytes(run_dir / "accuracy_by_type.png", png(figure))
    mean = lambda key: sum(r[key] or 0 for r in rows) / len(rows) if rows else float("nan")  # noqa: E731
    return {"types": len(results_by_type), "attributes": len(rows), "mean_nocot": mean("nocot"), "mean_cot": mean("cot"),
            "mean_hop_b": mean("hop_b")}
