"""summary.md and accuracy_vs_distractors.png of an in_context run (numbers from its results)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from runner.files import atomic_write_bytes, atomic_write_json, atomic_write_jsonl, atomic_write_text  # noqa: E402
from twohop.reports.tables import fmt  # noqa: E402
from twohop.plots import png  # noqa: E402

STYLE_NAMES = {"nocot": "no-CoT", "cot": "CoT"}


def mean_se(metric: dict) -> str:
    if metric["mean"] is None:
        return ""
    return f"{metric['mean']:.3f}" + (f" ± {metric['se']:.3f}" if metric["se"] is not None else "")


def summary_markdown(report: dict, title: str) -> str:
    # a run over the reference's files has one replicate per file where ours has one per data seed
    replicates = f"files {', '.join(report['files'])}" if "files" in report else f"data seeds {report['data_seeds']}"
    lines = [f"# {title}", "", f"Model: `{report['model']}`; {replicates}; "
             f"{report['candidates']} cities (chance {1 / report['candidates']:.3f}). Mean ± s.e. over these replicates. "
             "CoT accuracy is the final answer's; `chain` is the city the chain states. Wrong answers split into "
             "a distractor's e3 (wrong chain followed), another city, or no city; `distractor chance` is the "
             "distractor share uniformly guessed wrong cities would give; `prompt city` is the accuracy of naming "
             "one of the prompt's birthplaces at random (reading the prompt without chaining).", "",
             "| style | distractors | facts | n each | accuracy | prompt city | chain | first hop | wrong: distractor | "
             "distractor chance | wrong: other city | wrong: no city |", "|" + "---|" * 12]
    for s in report["settings"].values():
        n = next(iter(s["per_seed"].values()))["n"]
        chain = mean_se(s["chain_correct"]) if s["style"] == "cot" else ""
        lines.append(f"| {STYLE_NAMES[s['style']]} | {s['n_distractors']} | {s['n_facts']} | {n} | "
                     f"{mean_se(s['accuracy'])} | {fmt(s['prompt_city_chance']['mean'])} | {chain} | "
                     f"{mean_se(s['first_hop'])} | "
                     f"{mean_se(s['wrong_distractor_share'])} | {fmt(s['wrong_distractor_chance']['mean'])} | "
                     f"{mean_se(s['wrong_other_city_share'])} | {mean_se(s['wrong_no_city_share'])} |")
    return "\n".join(lines) + "\n"


def accuracy_plot(report: dict, title: str) -> bytes:
    """Accuracy (mean ± s.e. over seeds) against the number of distractor triplets, per style."""
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    settings = list(report["settings"].values())
    for style, color in (("cot", "#4c72b0"), ("nocot", "#dd8452")):
        points = sorted((s["n_distractors"], s["accuracy"]["mean"], s["accuracy"]["se"] or 0)
                        for s in settings if s["style"] == style)
        if points:
            x, y, err = zip(*points)
            axis.errorbar(x, y, yerr=err, marker="o", capsize=3, color=color, label=STYLE_NAMES[style])
    axis.axhline(1 / report["candidates"], color="black", linestyle="--", label="chance")
    counts = sorted({s["n_distractors"] for s in settings})
    prompt_city = {s["n_distractors"]: s["prompt_city_chance"]["mean"] for s in settings}
    axis.plot(counts, [prompt_city[c] for c in counts], color="gray", linestyle=":", marker="_", markersize=14,
              label="a random city from the prompt")  # the marker shows a single count
    if len(counts) > 2 and counts[-1] > 3 * max(counts[1], 1):
        axis.set_xscale("symlog", linthresh=1)
    axis.set_xticks(counts, [str(c) for c in counts])
    axis.set_ylim(0, 1)
    axis.set_xlabel("distractor triplets in the prompt")
    axis.set_ylabel("two-hop accuracy")
    axis.set_title(title)
    axis.legend(fontsize=8)
    return png(figure)


def write_in_context_outputs(report: dict, predictions: list, run_dir, title: str) -> None:
    """predictions.jsonl, summary.md, accuracy_vs_distractors.png and results.json of an in-context evaluation."""
    atomic_write_jsonl(run_dir / "predictions.jsonl", predictions)
    atomic_write_text(run_dir / "summary.md", summary_markdown(report, title))
    atomic_write_bytes(run_dir / "accuracy_vs_distractors.png", accuracy_plot(report, title))
    atomic_write_json(run_dir / "results.json", report)


def in_context_headline(report: dict) -> dict:
    """Accuracy per style and distractor count."""
    return {f"accuracy_{s['style']}_{s['n_distractors']}": s["accuracy"]["mean"] for s in report["settings"].values()}
