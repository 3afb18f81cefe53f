"""Reports of the intervention sub-jobs: summary.md and the figures (PNG bytes)."""
import numpy as np

from twohop.plots import png, plt


def _fraction(entry: dict) -> str:
    if entry["recovered"] is None:
        return "n/a"
    se = f" ± {entry['se']:.2f}" if entry["se"] is not None else ""
    return f"{entry['recovered']:.2f}{se}"


def patch_markdown(results: dict, label: str) -> str:
    """The patching grid and knockout curve as tables, with what they measure and their inputs."""
    summary, effect = results["summary"], results["summary"]["effect"]
    positions = list(summary["patch"])
    lines = [f"# Activation patching and attention knockout: {label}", "",
             f"Model: `{results['model']}`; items: {summary['n']} ({results['skipped']} without a same-length "
             f"partner skipped) from {', '.join(results['tests'])}.", "",
             f"Clean - corrupted logit difference (e3 vs e3', first answer token): {effect['mean']:.3f}"
             + (f" ± {effect['se']:.3f} (s.e. over items)" if effect["se"] is not None else ""), "",
             "Recovered fraction = (intervened - corrupted) / (clean - corrupted), a ratio of means over items "
             "with a bootstrap s.e.; it means something only where the effect above is clearly positive.", "",
             "## Clean -> corrupted residual patching", "",
             "State 0 = embeddings, state i = decoder layer i's output. t1 = last token of e1, r = the question's "
             "other tokens, t2 = the last prompt token.", "",
             "| state | " + " | ".join(positions) + " |", "|---" * (len(positions) + 1) + "|"]
    for i, first in enumerate(summary["patch"][positions[0]]):
        lines.append(f"| {first['layer']} | " + " | ".join(_fraction(summary["patch"][p][i]) for p in positions) + " |")
    for position, curve in summary["knockout"].items():
        lines += ["", f"## Attention knockout {position}, on the clean prompt", "", "| decoder layer | recovered |",
                  "|---|---|"] + [f"| {entry['layer']} | {_fraction(entry)} |" for entry in curve]
    lines += ["", f"Parity check (hooks that do nothing; largest logit difference): {results['parity']}", ""]
    return "\n".join(lines)


def heat_map(summary: dict, title: str) -> bytes:
    """Recovered fraction per state (rows) and position (columns), annotated."""
    positions = list(summary["patch"])
    layers = [entry["layer"] for entry in summary["patch"][positions[0]]]
    grid = np.array([[np.nan if e["recovered"] is None else e["recovered"] for e in summary["patch"][p]]
                     for p in positions]).T
    figure, axis = plt.subplots(figsize=(1.2 * len(positions) + 2.5, 0.35 * len(layers) + 1.8), dpi=100)
    image = axis.imshow(grid, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto", origin="lower")
    for (row, column), value in np.ndenumerate(grid):
        axis.text(column, row, "" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=7)
    axis.set_xticks(range(len(positions)), positions)
    axis.set_yticks(range(len(layers)), layers)
    axis.set_xlabel("position patched (clean -> corrupted)")
    axis.set_ylabel("state (0 = embeddings)")
    axis.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axis, label="recovered fraction")
    return png(figure)


def knockout_plot(summary: dict, title: str) -> bytes:
    """Recovered fraction after cutting t2's attention to e1, per decoder layer, with s.e. bars."""
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    for position, curve in summary["knockout"].items():
        layers = [e["layer"] for e in curve]
        axis.errorbar(layers, [np.nan if e["recovered"] is None else e["recovered"] for e in curve],
                      yerr=[e["se"] or 0 for e in curve], marker="o", capsize=3, label=f"knockout {position}")
    axis.axhline(1.0, color="grey", linestyle="dotted", linewidth=1)
    axis.axhline(0.0, color="grey", linestyle="dotted", linewidth=1)
    axis.set_xticks(layers)
    axis.set_xlabel("decoder layer whose attention t2 -> e1 is cut")
    axis.set_ylabel("recovered fraction")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)
    return png(figure)


def _rate(entry: dict) -> str:
    return "n/a" if entry["rate"] is None else f"{entry['rate']:.1%} ± {entry['se']:.1%} (n={entry['n']})"


def backpatch_markdown(results: dict, label: str) -> str:
    """Accuracy unpatched, the oracle and best-pair fix rates, preservation, and every pair's rates."""
    summary, best = results["summary"], results["summary"]["best_pair"]
    lines = [f"# Back-patching (Hopping Too Late): {label}", "",
             f"Model: `{results['model']}`; {summary['n']} questions from {', '.join(results['tests'])}; "
             f"states patched at {', '.join(results['positions'])}; {results['pairs']} (source > target) pairs "
             f"per position (layer stride {results['layer_stride']}).", "",
             f"- Accuracy without patching: {_rate(summary['accuracy'])} ({summary['wrong']} wrong, "
             f"{summary['right']} right)"]
    lines += [f"- Oracle fix rate ({position}: each wrong question fixed by any pair): {_rate(entry)}"
              for position, entry in summary["oracle_fix"].items()]
    if best:
        lines += [f"- Best single pair: {best['position']} state {best['source']} -> state {best['target']}: fixes "
                  f"{_rate(best['fix'])} of the wrong, preserves {_rate(best['preserve'])} of the right"]
    lines += ["", "State 0 = embeddings, state i = decoder layer i's output; the oracle chooses a pair per question "
              "(an upper bound), the best single pair is chosen on the same questions.", "",
              "| position | source | target | fix rate (wrong) | preserved (right) |", "|---|---|---|---|---|"]
    lines += [f"| {e['position']} | {e['source']} | {e['target']} | {_rate(e['fix'])} | {_rate(e['preserve'])} |"
              for e in summary["pairs"]]
    lines += ["", f"Parity check (hooks that do nothing; largest logit difference): {results['parity']}", ""]
    return "\n".join(lines)


def backpatch_plot(summary: dict, states: int, title: str) -> bytes:
    """Fix rate of each (source, target) pair, one panel per patched position."""
    positions = sorted({e["position"] for e in summary["pairs"]})
    figure, axes = plt.subplots(1, max(len(positions), 1), figsize=(4.2 * max(len(positions), 1), 3.8), dpi=100,
                                squeeze=False)
    for axis, position in zip(axes[0], positions):
        grid = np.full((states, states), np.nan)
        for e in summary["pairs"]:
            if e["position"] == position and e["fix"]["rate"] is not None:
                grid[e["source"], e["target"]] = e["fix"]["rate"]
        image = axis.imshow(grid, cmap="viridis", vmin=0, vmax=1, origin="lower")
        axis.set_xticks(range(states))
        axis.set_yticks(range(states))
        axis.set_xlabel("target state (patched into)")
        axis.set_ylabel("source state (copied from)")
        axis.set_title(f"fix rate at {position}", fontsize=9)
        figure.colorbar(image, ax=axis)
    figure.suptitle(title, fontsize=9)
    return png(figure)


def _mean_se(entry: dict) -> str:
    if entry["mean"] is None:
        return "n/a"
    return f"{entry['mean']:.3f}" + (f" ± {entry['se']:.3f}" if entry["se"] is not None else "")


def _probe_headline(key: str, entry: dict, questions: int) -> str:
    if not entry["testable"]:
        return (f"- {key}: not measurable: 0 of {questions} questions testable (no e1 group can be held out with its "
                "classes seen in training: they belong to it alone)")
    best, first = entry["best"], entry["first_decodable"]
    if best is None:
        return f"- {key}: no split held out a question (at most {entry['testable']} of {questions} testable)"
    found = "none" if first is None else f"state {first}"
    return (f"- {key}: first decodable state {found} ({entry['testable']} of {questions} questions testable); "
            f"largest selectivity at state {best['state']}: accuracy {_mean_se(best['accuracy'])} vs control "
            f"{_mean_se(best['control'])}, chance {best['chance']:.3f}, {best['test_questions']:.0f} test questions "
            "per split")


def _label_line(label: dict, held_out) -> str:
    """The binary label's counts and what became of its direction (saved, refused, or saved but not
    decodable on held-out questions)."""
    counts = ", ".join(f"{count} {value}" for value, count in label["counts"].items())
    line = f"Binary label `{label['name']}`: {counts}. "
    if label["refused"]:
        return line + label["refused"]
    line += (f"Its probe at {label['position']}, fitted on every question, is saved per state in "
             f"`{label['direction']}` (kind probe) for intervene_steer.")
    if held_out is not None and held_out["first_decodable"] is None:
        line += (f" Split by entity, that probe is above chance and control at no state at {label['position']}: "
                 "the direction separates the questions it was fitted on; nothing shows that it generalises.")
    return line


def probe_markdown(results: dict, title: str) -> str:
    """Headlines (first decodable state per target and position), the label and its direction, every cell."""
    label, n = results["label"], results["questions"]
    lines = [f"# Linear probes: {title}", "",
             f"Model: `{results['model']}`; {n} questions from {', '.join(results['tests'])}; positions "
             f"{', '.join(results['positions'])}; {results['split_seeds']} entity splits (at most "
             f"{results['test_fraction']:.0%} of the questions held out, whole e1 entities, classes kept); l2 = "
             f"{results['l2']:g}.", "",
             "Probe: multinomial logistic regression on standardised states. Control: the same on labels permuted "
             "among entities (Hewitt and Liang); selectivity = accuracy - control. Chance = max(1 / training classes, "
             "the commonest training class's rate on the test questions). Means over splits, s.e. corrected for the "
             "splits' overlap (Nadeau and Bengio); decodable = accuracy above chance and selectivity above 2 s.e. "
             "State 0 = embeddings, state i = decoder layer i's output.", "", "## Headline", ""]
    lines += [_probe_headline(key, entry, n) for key, entry in results["headline"].items()]
    if label["name"]:
        lines += ["", _label_line(label, results["headline"].get(f"{label['name']}@{label['position']}"))]
    for target, entry in results["summary"].items():
        m = entry["measurability"]
        lines += ["", f"## {target}", "", f"{m['questions']} questions, {m['groups']} e1 groups (e1 joined by their "
                  f"last token), {m['classes']} classes, {m['classes_shared_by_groups']} shared by two or more groups; "
                  f"at most {m['testable']} questions testable."]
        for position, found in entry["positions"].items():
            lines += ["", f"### {target} at {position}", "",
                      "| state | accuracy | control | selectivity | chance | classes | test questions |",
                      "|---|---|---|---|---|---|---|"]
            lines += [f"| {e['state']} | {_mean_se(e['accuracy'])} | {_mean_se(e['control'])} | "
                      f"{_mean_se(e['selectivity'])} | {e['chance']:.3f} | {e['classes']:.0f} | "
                      f"{e['test_questions']:.0f} |"
                      for e in found["states"]]
    lines += ["", f"Parity check (hooks that do nothing; largest logit difference): {results['parity']}", ""]
    return "\n".join(lines)


def probe_plot(summary: dict, title: str) -> bytes:
    """Accuracy per state of every probed target (rows) and position (columns), beside its control and chance."""
    measured = [t for t, e in summary.items() if any(f["states"] for f in e["positions"].values())]
    positions = list(next(iter(summary.values()))["positions"]) if summary else []
    figure, axes = plt.subplots(max(len(measured), 1), max(len(positions), 1), squeeze=False, dpi=100,
                                figsize=(3.8 * max(len(positions), 1), 2.6 * max(len(measured), 1) + 0.6))
    for row, target in enumerate(measured):
        for column, position in enumerate(positions):
            axis, cells = axes[row][column], summary[target]["positions"][position]["states"]
            states = [e["state"] for e in cells]
            for name, style in (("accuracy", "-o"), ("control", "--s")):
                axis.errorbar(states, [np.nan if e[name]["mean"] is None else e[name]["mean"] for e in cells],
                              yerr=[e[name]["se"] or 0 for e in cells], fmt=style, capsize=3,
                              label="probe" if name == "accuracy" else "control (shuffled labels)")
            axis.plot(states, [e["chance"] for e in cells], ":", color="black", label="chance")
            axis.set_xticks(states)
            axis.set_ylim(0, 1)
            axis.set_title(f"{target} at {position}", fontsize=9)
            axis.set_xlabel("state (0 = embeddings)", fontsize=8)
            axis.set_ylabel("test accuracy", fontsize=8)
    if measured:
        axes[0][0].legend(fontsize=7)
    figure.suptitle(title, fontsize=9)
    return png(figure)
