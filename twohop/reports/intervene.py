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


def _effect(entry, top: bool = False) -> str:
    if not entry:
        return "n/a"
    se = f" ± {entry['se']:.3f}" if entry["se"] is not None else ""
    share = f"; {entry['top_reply_share']:.0%} '{entry['top_reply'][:20]}'" if top else ""
    return f"{entry['effect']:+.3f}{se} ({entry['steered']:.2f}{share})"


def _steer_settings(results: dict) -> list:
    config, summary = results["config"], results["summary"]
    source = (f"contrast `{config['contrast']}` (difference of means, first minus second set)"
              if config["directions_from"] == "means" else f"the probe's `{results['directions_source']}`")
    order = ["two_hop", "one_hop", "hop_a", "hop_b"]
    names = [n for n in order if n in summary["baseline"]] + sorted(set(summary["baseline"]) - set(order))
    baseline = "; ".join(f"{name} {summary['baseline'][name]['accuracy']:.3f} ± {summary['baseline'][name]['se']:.3f} "
                         f"(n={summary['baseline'][name]['n']})" for name in names)
    steered = "every generated token" if config["when"] == "every_token" else "the prompt pass"
    return [f"Model: `{results['model']}`; questions from {', '.join(results['tests'])}; directions from {source}; "
            f"mode `{config['mode']}`, steering {steered}"
            f", add's unit `{config['scale_unit']}`; " + ("directions fit on half of the people, effects graded on the "
                                                          "other half." if config["heldout"] else
                                                          "directions fit and graded on the same questions (in-sample)."),
            "", f"Unsteered accuracy: {baseline}.", "",
            "Each cell: steered - unsteered accuracy ± s.e. of the paired per-item differences (steered accuracy; "
            "for two_hop also the commonest steered reply's share: a steer that makes every reply one city scores that "
            "city's share of the items). one_hop = the first and second hops of the graded two-hop questions (the side "
            "effect)."]


def steer_markdown(results: dict, label: str) -> str:
    """Effect per position x state x scale on every graded set, the directions' norms, the best intervention."""
    summary = results["summary"]
    groups = list(dict.fromkeys(g for e in summary["grid"] for g in e["effects"] if g not in ("hop_a", "hop_b")))
    lines = [f"# Steering: {label}", ""] + _steer_settings(results) + [""]
    lines += ["| position | state | scale | " + " | ".join(groups) + " |", "|---" * (len(groups) + 3) + "|"]
    lines += [f"| {e['position']} | {e['state']} | {e['scale']:g} | " +
              " | ".join(_effect(e["effects"].get(g), top=g == "two_hop") for g in groups) + " |" for e in summary["grid"]]
    best = summary["best"]
    if best:
        lines += ["", f"Largest two-hop effect: {best['position']} state {best['state']} scale {best['scale']:g}: "
                  f"{_effect(best['effects']['two_hop'])}, one-hop {_effect(best['effects'].get('one_hop'))} "
                  "(the best of the grid on these items: optimistic)."]
    lines += ["", "## Directions", "", "| position | state | direction norm | mean state norm | ratio |",
              "|---|---|---|---|---|"]
    lines += [f"| {p} | {s} | {n['direction']:.4g} | {n['state']:.4g} | " +
              ("n/a" if n["ratio"] is None else f"{n['ratio']:.3g}") + " |"
              for p, states in results["norms"].items() for s, n in states.items()]
    skipped = {p: s for p, s in results["skipped_states"].items() if s}
    if skipped:
        lines += ["", f"Not steered (direction 0: both sets' means are equal there): {skipped}"]
    lines += ["", f"Files: {results['directions_files'] or 'the probe run holds the directions'}; parity check "
              f"(largest logit difference): {results['parity']}", ""]
    return "\n".join(lines)


def steer_plot(summary: dict, title: str) -> bytes:
    """Effect per state, one line per scale, with s.e. bars: a row per position, two-hop and one-hop panels."""
    positions = list(dict.fromkeys(e["position"] for e in summary["grid"])) or ["t2"]
    figure, axes = plt.subplots(len(positions), 2, figsize=(10, 3.4 * len(positions)), dpi=100, squeeze=False)
    for row, position in enumerate(positions):
        entries = [e for e in summary["grid"] if e["position"] == position]
        for axis, group in zip(axes[row], ("two_hop", "one_hop")):
            for scale in sorted({e["scale"] for e in entries}):
                points = [(e["state"], e["effects"][group]) for e in entries
                          if e["scale"] == scale and group in e["effects"]]
                if points:
                    axis.errorbar([s for s, _ in points], [p["effect"] for _, p in points],
                                  yerr=[p["se"] or 0 for _, p in points], marker="o", capsize=3, label=f"scale {scale:g}")
            axis.axhline(0.0, color="grey", linestyle="dotted", linewidth=1)
            axis.set_xticks(sorted({e["state"] for e in entries}))
            axis.set_xlabel("state steered (0 = embeddings)")
            axis.set_ylabel("steered - unsteered accuracy")
            axis.set_title(f"{group.replace('_', '-')} at {position}", fontsize=9)
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=7)
    figure.suptitle(title, fontsize=9)
    return png(figure)
