"""report.md, report.json, figure1.png and loss_gap.png from the evaluation runs the study read.

Every number is read from a prerequisite's results.json (or the finetune run's metrics.jsonl) and
report.json names the files, so a reader can trace each cell. "Chance" tests use the standard error
a guesser would have over all the setting's questions, sqrt(c (1 - c) / N): a setting is "above
chance" when its no-CoT accuracy is more than 2 such errors above c.
"""
import json
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from runner.errors import UserError  # noqa: E402
from runner.files import atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: E402
from twohop.reports.tables import fmt, markdown_table  # noqa: E402
from twohop.plots import COT_FINAL, cot_nocot_bars, png  # noqa: E402
from twohop.stats import mean_se, pooled_gap, z_vs_chance  # noqa: E402
from twohop.reports.evaluation import by_kind, premise_holds, write_semi_synthetic_report  # noqa: E402

LABELS = {"spouses": "separate documents", "spouses_nocot": "separate documents (no-CoT demos)",
          "spouses_atomic": "separate documents (no demos)", "samedoc": "same document",
          "samedoc_distractors": "same document + distractor", "samedoc_triplets": "same document + 10 triplets",
          "aux_logit": "separate documents + logit-lens loss", "aux_cosine": "separate documents + cosine loss"}
VERDICTS = {True: "yes", False: "**no**", None: "premise fails"}
COLUMNS = ("setting", "runs", "n", "nocot", "nocot_se", "cot", "cot_se", "chance", "z_vs_chance", "acc_a", "acc_b",
           "loss_gap", "loss_gap_ci95")


def read_json(path):
    return json.loads(path.read_text())


def row(setting, runs, nocot, cot, chance, n, sources, **extra) -> dict:
    """One setting: no-CoT and CoT accuracy as (mean, s.e.) over its runs (seeds, data seeds or entity types)."""
    (nocot_mean, nocot_se), (cot_mean, cot_se) = mean_se(nocot), mean_se(cot)
    chance_mean = statistics.fmean(chance)
    return {"setting": setting, "runs": runs, "n": n, "nocot": nocot_mean, "nocot_se": nocot_se, "cot": cot_mean,
            "cot_se": cot_se, "chance": chance_mean, "z_vs_chance": z_vs_chance(nocot_mean, chance_mean, n),
            "sources": [str(s) for s in sources], **extra}


def synthetic_row(setting: str, evaluations: dict) -> dict:
    """A fine-tuning setting over seeds: evaluations is {seed: evaluate_twohop run folder}."""
    results = {seed: read_json(folder / "results.json") for seed, folder in evaluations.items()}
    headline = lambda key: [r["headline"].get(key) for r in results.values()]  # noqa: E731
    return row(LABELS.get(setting, setting), f"seeds {', '.join(map(str, results))}",
               headline("acc_2hop_nocot"), headline("acc_2hop_cot"), headline("chance"),
               sum(s["n"] for r in results.values() for s in two_hop_tests(r, "nocot")),
               [folder / "results.json" for folder in evaluations.values()],
               acc_a=mean_se(headline("acc_a"))[0], acc_b=mean_se(headline("acc_b"))[0],
               loss_gap=mean_se(headline("loss_gap"))[0], variant=setting,
               loss_gap_ci95=[r["loss_gaps"][t]["ci95"] for r in results.values() for t in r["loss_gaps"]
                              if r["tests"].get(t, {}).get("kind") == "two_hop"])


def in_context_row(folders: dict) -> dict:
    """The in-context setting over data seeds: folders is {style: in_context run folder}, one setting each.
    Its chance is the better of a uniform guess and naming a random birthplace from the prompt: a model
    that reads the prompt without chaining gets the latter (9.9% with 10 distractor triplets)."""
    (nocot,), (cot,) = (read_json(folders[s] / "results.json")["settings"].values() for s in ("nocot", "cot"))
    nocot_chance, cot_chance = (max(s["chance"], prompt_city_chance(s, folders[s["style"]])) for s in (nocot, cot))
    return row(f"in context ({nocot['n_distractors']} distractor triplets)",
               f"data seeds {', '.join(nocot['per_seed'])}", nocot["accuracy"]["values"], cot["accuracy"]["values"],
               [nocot_chance], sum(s["n"] for s in nocot["per_seed"].values()),
               [folders[s] / "results.json" for s in ("nocot", "cot")], uniform_chance=nocot["chance"],
               cot_chance=cot_chance, first_hop=cot["first_hop"]["mean"])


def prompt_city_chance(setting: dict, folder) -> float:
    """An in-context setting's rate of naming a random birthplace from the prompt (its rows differ by style)."""
    rate = setting.get("prompt_city_chance", {}).get("mean")
    if rate is None:
        raise UserError(f"{folder / 'results.json'} has no prompt_city_chance (written before it was graded): rerun "
                        f"it with --force --jobs in_context_{setting['style']} and the same --model")
    return rate


def two_hop_tests(results: dict, style: str) -> list:
    """The summaries of an evaluation's two-hop tests of a style (its card's metadata, not file names)."""
    return [s for s in results["tests"].values() if s.get("kind") == "two_hop" and s["style"] == style]


def semi_synthetic_row(results_by_type: dict, sources) -> dict:
    """The semi-synthetic setting over (entity type, attribute) tests: the final answer's accuracy, and
    `premise`: the same over the tests where hop B is known and the first hop learned."""
    tests = []
    for results in results_by_type.values():
        cot = {s["attribute"]: s for s in two_hop_tests(results, "cot")}
        first_hop = by_kind(results["tests"], "hop_a").get("correct")
        tests += [(nocot, cot.get(nocot["attribute"], {}), by_kind(results["tests"], "hop_b", nocot["attribute"]).get("correct"),
                   first_hop, results["loss_gaps"].get(name))
                  for name, nocot in results["tests"].items()
                  if nocot.get("kind") == "two_hop" and nocot["style"] == "nocot" and nocot["n"]]
    held = [t for t in tests if premise_holds(t[2], t[3])]
    premise = {"tests": len(held), "of": len(tests), "hop_b": [t[2] for t in tests], "first_hop": [t[3] for t in tests]}
    if held:  # pooled over questions, against the better of uniform chance and guessing the commonest answer
        n = sum(t[0]["n"] for t in held)
        mean = sum(t[0]["correct"] * t[0]["n"] for t in held) / n
        chance = sum(max(t[0]["chance"], t[0].get("majority", 0)) * t[0]["n"] for t in held) / n
        premise.update(nocot=mean, n=n, chance=chance, z_vs_chance=z_vs_chance(mean, chance, n))
        gaps = [t[4] for t in held if t[4]]
        premise["loss_gap"] = pooled_gap(gaps) if gaps else None
    return row("semi-synthetic (fact B from pretraining)",
               f"{len(tests)} tests of {len(results_by_type)} entity type(s)", [n["correct"] for n, *_ in tests],
               [c.get("correct") for _, c, *_ in tests], [n["chance"] for n, *_ in tests],
               sum(n["n"] for n, *_ in tests), sources, premise=premise)


def findings(rows: dict) -> list:
    """The paper's qualitative results, each checked against the measured table."""
    checks = []
    separate = rows.get("spouses")
    if separate:
        cot_z = z_vs_chance(separate["cot"], separate["chance"], separate["n"])
        checks += [
            ("separate documents: no-CoT within 2 s.e. of chance", f"z = {separate['z_vs_chance']:+.2f}",
             abs(separate["z_vs_chance"]) <= 2),
            ("separate documents: CoT above chance (z > 2)", f"{separate['cot']:.1%} vs chance "
             f"{separate['chance']:.1%}, z = {cot_z:+.2f}", cot_z > 2),
            ("separate documents: atomic recall >= 95% (both hops)",
             f"A {separate['acc_a']:.1%}, B {separate['acc_b']:.1%}", min(separate["acc_a"], separate["acc_b"]) >= 0.95),
        ]
    for key, name, chance in (("samedoc", "same document", "chance"),
                              ("in_context", "in context", "a random city from the prompt")):
        if key in rows:
            checks.append((f"{name}: no-CoT above {chance} (z > 2)", f"{rows[key]['nocot']:.1%} vs "
                           f"{rows[key]['chance']:.1%}, z = {rows[key]['z_vs_chance']:+.2f}", rows[key]["z_vs_chance"] > 2))
    if "in_context" in rows:
        in_context = rows["in_context"]
        cot_z = z_vs_chance(in_context["cot"], in_context["cot_chance"], in_context["n"])
        checks.append(("in context: CoT above a random city from the prompt (z > 2)",
                       f"{in_context['cot']:.1%} vs {in_context['cot_chance']:.1%}, z = {cot_z:+.2f}; the chain names "
                       f"the bridge in {in_context['first_hop']:.1%}", cot_z > 2))
    if "semi_synthetic" in rows:
        checks += [semi_synthetic_finding(rows["semi_synthetic"]["premise"]),
                   semi_synthetic_gap_finding(rows["semi_synthetic"]["premise"])]
    return [{"claim": claim, "measured": measured, "holds": None if holds is None else bool(holds)}
            for claim, measured, holds in checks]


def semi_synthetic_finding(premise: dict) -> tuple:
    """Above chance where the premise holds (hop B known, first hop learned); `None` when it holds nowhere."""
    claim = ("semi-synthetic: no-CoT above chance (z > 2; chance: the better of 1/|candidates| and the commonest "
             "answer's share) where hop B is known (>= 50%) and the first hop learned (>= 90%)")
    if not premise["tests"]:
        hop_b = ", ".join("n/a" if v is None else f"{v:.0%}" for v in premise["hop_b"])
        first = ", ".join(sorted({"n/a" if v is None else f"{v:.0%}" for v in premise["first_hop"]}))
        return claim, f"premise fails on all {premise['of']} tests (hop B: {hop_b}; first hop: {first})", None
    if premise["z_vs_chance"] is None:
        return claim, f"chance is {premise['chance']:.0%} on the tests where the premise holds: nothing to test", None
    return claim, (f"{premise['nocot']:.1%} vs chance {premise['chance']:.1%} on the {premise['tests']} of "
                   f"{premise['of']} tests where it holds, z = {premise['z_vs_chance']:+.2f}"), premise["z_vs_chance"] > 2


def semi_synthetic_gap_finding(premise: dict) -> tuple:
    """The shuffled-answer loss gap where the premise holds: above zero means the model prefers each
    person's true answer to another person's, which only composing the two hops can give."""
    claim = ("semi-synthetic: no-CoT loss gap (shuffled minus true answer) above zero, 95% interval, where the "
             "premise holds")
    gap = premise.get("loss_gap")
    if gap is None:
        return claim, "premise fails on every test with a loss gap", None
    return claim, (f"{gap['gap']:+.2f} nats [{gap['ci95'][0]:+.2f}, {gap['ci95'][1]:+.2f}] over {gap['n']} "
                   f"questions of {gap['tests']} tests"), gap["ci95"][0] > 0


def figure1(rows: list, title: str) -> bytes:
    """The paper's Figure 1 shape: per setting, CoT (final answer) and no-CoT accuracy (s.e. bars) and chance."""
    col = lambda key: [r[key] for r in rows]  # noqa: E731
    return cot_nocot_bars([r["setting"].replace(" (", "\n(") for r in rows], col("cot"), col("cot_se"), col("nocot"),
                          col("nocot_se"), col("chance"), title, COT_FINAL, "two-hop accuracy (mean ± s.e.)", 8,
                          width_per_bar=1.9, height=4.2, dpi=110)


def loss_gap_plot(finetune_runs: dict, title: str) -> bytes:
    """Shuffled-minus-true loss of no-CoT two-hop answers over training, per setting (thin: seeds, with
    their 95% intervals shaded)."""
    figure, axis = plt.subplots(figsize=(6.5, 4), dpi=110)
    for (setting, runs), color in zip(finetune_runs.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        curves = []
        for folder in runs.values():
            evals = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
            curves.append([(e["step"], e["2hop_nocot/loss_gap"]) for e in evals if "2hop_nocot/loss_gap" in e])
            axis.plot(*zip(*curves[-1]), color=color, alpha=0.3, linewidth=1)
            bands = [(e["step"], *e["2hop_nocot/loss_gap_ci95"]) for e in evals if "2hop_nocot/loss_gap_ci95" in e]
            if bands:  # each run's 95% bootstrap interval over questions
                axis.fill_between(*zip(*bands), color=color, alpha=0.08, linewidth=0)
        steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
        mean = [statistics.fmean(dict(c)[s] for c in curves) for s in steps]
        axis.plot(steps, mean, color=color, linewidth=2, label=f"{LABELS.get(setting, setting)} (mean of {len(curves)})")
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xlabel("training step")
    axis.set_ylabel("loss(shuffled) - loss(true), nats")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)
    return png(figure)


def cell(key, value) -> str:
    if key in ("nocot", "nocot_se", "cot", "cot_se", "chance", "acc_a", "acc_b") and value is not None:
        return f"{100 * value:.1f}%"
    if key == "loss_gap_ci95" and value:  # each run's 95% bootstrap interval over questions
        return "; ".join(f"[{low:+.2f}, {high:+.2f}]" for low, high in value)
    return f"{value:+.2f}" if key in ("z_vs_chance", "loss_gap") and value is not None else fmt(value)


def write_report(run_dir, model, synthetic: dict, in_context: dict, semi: dict, log) -> dict:
    """synthetic: {setting: {seed: (finetune folder, evaluate folder)}}; in_context: {style: folder};
    semi: {entity type: evaluate folder}."""
    rows = {setting: synthetic_row(setting, {seed: ev for seed, (_, ev) in runs.items()}) for setting, runs in synthetic.items()}
    rows["in_context"] = in_context_row(in_context)
    semi_results = {t: read_json(folder / "results.json") for t, folder in semi.items()}
    if semi_results:
        rows["semi_synthetic"] = semi_synthetic_row(semi_results, [f / "results.json" for f in semi.values()])
        (run_dir / "semi_synthetic").mkdir(exist_ok=True)
        write_semi_synthetic_report(semi_results, run_dir / "semi_synthetic", f"semi-synthetic [{model.name}]")
    table, checks = list(rows.values()), findings(rows)
    title = f"Two-hop accuracy by setting [{model.name}]"
    atomic_write_bytes(run_dir / "figure1.png", figure1(table, title))
    finetune_runs = {setting: {seed: ft for seed, (ft, _) in runs.items()} for setting, runs in synthetic.items()}
    atomic_write_bytes(run_dir / "loss_gap.png", loss_gap_plot(finetune_runs, f"No-CoT loss gap over training [{model.name}]"))
    atomic_write_json(run_dir / "report.json", {"model": model.name, "settings": rows, "findings": checks})

    semi_table = (run_dir / "semi_synthetic" / "summary.md").read_text().split("\n", 2)[2] if semi_results else ""
    lines = [f"# Two-hop latent reasoning: the study on `{model.name}`", "",
             "No-CoT and CoT accuracy on two-hop questions about fictional people, per setting (mean ± s.e. over "
             "runs; `chance`: a uniform guess among the setting's answers, and for the in-context setting the "
             "better of that and naming a random birthplace from the prompt, which reading without chaining gives; "
             "`z_vs_chance`: no-CoT minus chance in units of a guesser's standard error over all `n` questions; "
             "`loss_gap`: shuffled-minus-true loss of the no-CoT answer, with each run's 95% bootstrap interval over "
             "questions in `loss_gap_ci95`: a gap whose interval covers 0 is no evidence of a leak).", "",
             "![Figure 1](figure1.png)", "", *markdown_table(COLUMNS, table, cell), "",
             "## Findings of the paper, checked", "", "| claim | measured | holds |", "|---|---|---|",
             *[f"| {c['claim']} | {c['measured']} | {VERDICTS[c['holds']]} |" for c in checks], "",
             "## Loss gap over training", "", "![loss gap](loss_gap.png)", ""]
    if semi_results:
        lines += ["## Semi-synthetic, per entity type", "", "![per type](semi_synthetic/accuracy_by_type.png)", "",
                  semi_table.strip(), ""]
    lines += ["## Sources", "", *[f"- {r['setting']}: " + ", ".join(f"`{s}`" for s in r["sources"]) for r in table], ""]
    atomic_write_text(run_dir / "report.md", "\n".join(lines))
    for check in checks:
        log.info("%s %s: %s", VERDICTS[check["holds"]].strip("*"), check["claim"], check["measured"])
    return {f"{key}/{metric}": r[metric] for key, r in rows.items() for metric in ("nocot", "cot", "chance")} | \
        {"findings_holding": sum(c["holds"] is True for c in checks), "findings": len(checks)}
