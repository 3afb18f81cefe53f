"""Reports of the intervention sub-jobs: summary.md and the figures (PNG bytes)."""
import numpy as np

from twohop.plots import finish_layer_plot, png, plt


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


ENTREC_LABELS = {"first_hop_e1": "first hop (vs e1-substituted)", "first_hop_r1": "first hop (vs r1-substituted)",
                 "second_hop": "second hop (d CnstScore > 0)", "traversal_e1": "traversal (e1)",
                 "traversal_r1": "traversal (r1)"}


def _frequency(entry: dict) -> str:
    if entry["frequency"] is None:
        return "n/a"
    return f"{entry['frequency']:.2f} ± {entry['se']:.2f} (n={entry['n']}, z={entry['z']:+.1f})"


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.3g}"


ENTREC_METHOD = ("ENTREC(l) = log-probability of e2's first token under the logit lens of state l (0 = embeddings) "
                 "at the end of the descriptive mention (the end of `auxiliary_loss_prefix`: e1's last token or the "
                 "relation word after e1). First hop: ENTREC higher on the real prompt than on the e1- or "
                 "r1-substituted one (ties, where the substitution has not reached the mention end, are not counted; "
                 "state 0 compares token embeddings, not recall). Second hop: d CnstScore / d alpha > 0 when alpha "
                 "grad ENTREC(l) is added at state l (none at the last state). Traversal: both. Frequency ± binomial "
                 "s.e., z against 0.5 (for traversal, two independent coin flips would give 0.25).")


def _entrec_scores(summary: dict) -> list:
    """Table rows: mean ENTREC (real, substituted), ties, mean derivative, median |cosine| per state."""
    mean, ties = summary["mean"], summary["ties"]
    return [f"| {s} | " + " | ".join([_number(mean["entrec"][i]), _number(mean["entrec_e1"][i]),
                                      _number(mean["entrec_r1"][i]), f"{ties['e1'][i]} / {ties['r1'][i]}",
                                      _number(mean["derivative"][i]), _number(summary["median_abs_cosine"][i])]) + " |"
            for i, s in enumerate(summary["states"])]


def entrec_markdown(results: dict, label: str) -> str:
    """The three hops' frequencies per state against 0.5, ties, mean scores, and what was compared."""
    summary, skipped, curves = results["summary"], results["skipped"], results["summary"]["curves"]
    lines = [f"# Entity recall and consistency (Yang et al. 2024): {label}", "",
             f"Model: `{results['model']}`; {summary['n']} two-hop questions from {', '.join(results['tests'])} "
             f"({skipped['no_one_hop']} without a one-hop question about their e2 skipped; "
             f"{skipped['no_e1_partner']} without an e1 substitute, {skipped['no_relation_swap']} without a relation "
             f"swap); one-hop questions from {', '.join(results['one_hop_tests'])}.", "", ENTREC_METHOD, "",
             "| state | " + " | ".join(ENTREC_LABELS[m] for m in curves) + " |", "|---" * (len(curves) + 1) + "|"]
    lines += [f"| {s} | " + " | ".join(_frequency(curves[m][i]) for m in curves) + " |"
              for i, s in enumerate(summary["states"])]
    lines += ["", "| state | mean ENTREC real | e1-substituted | r1-substituted | ties e1 / r1 | mean derivative | "
              "median abs cosine of the two gradients |", "|---|---|---|---|---|---|---|"] + _entrec_scores(summary)
    lines += ["", "Largest frequency over states 1 on (state 0 compares token embeddings; the maximum is biased "
              "upwards by the choice of state):", ""]
    lines += [f"- {ENTREC_LABELS[m]}: " + (f"{_frequency(best)} at state {best['state']}" if best else "n/a")
              for m, best in summary["best"].items()]
    lines += ["", f"Relation swaps: {results['relation_swaps']}", "",
              f"Parity check (hooks that do nothing; largest logit difference): {results['parity']}", ""]
    return "\n".join(lines)


def entrec_plot(summary: dict, title: str) -> bytes:
    """First-hop, second-hop and traversal frequencies per state with s.e. bars, 0.5 (and 0.25) marked."""
    figure, axis = plt.subplots(figsize=(6.5, 4), dpi=100)
    styles = {"first_hop_e1": ("C0", "-", "o"), "first_hop_r1": ("C0", "--", "s"), "second_hop": ("C1", "-", "^"),
              "traversal_e1": ("C2", "-", "o"), "traversal_r1": ("C2", "--", "s")}
    for measure, curve in summary["curves"].items():
        shown = [e for e in curve if e["frequency"] is not None]
        color, line, marker = styles[measure]
        axis.errorbar([e["state"] for e in shown], [e["frequency"] for e in shown], yerr=[e["se"] for e in shown],
                      color=color, linestyle=line, marker=marker, capsize=3, label=ENTREC_LABELS[measure])
    axis.axhline(0.5, color="grey", linestyle="dashed", linewidth=1, label="0.5")
    axis.axhline(0.25, color="grey", linestyle="dotted", linewidth=1, label="0.25 (traversal, independent hops)")
    axis.set_ylim(-0.05, 1.05)
    return finish_layer_plot(axis, figure, summary["states"], "frequency over questions", title, legend_size=7)
def _share(entry: dict) -> str:
    return "n/a" if entry["rate"] is None else f"{entry['rate']:.0%} ± {entry['se']:.0%}"


def _readable_cell(entry: dict) -> str:
    if entry["rate"] is None:
        return "n/a (n=0)"
    earliest = "" if entry["earliest_min"] is None else \
        f"; earliest state median {entry['earliest_median']:g}, min {entry['earliest_min']}"
    return f"{_share(entry)} (n={entry['n']}{earliest}; control names it for {entry['control_names_it']})"


def _patchscope_prompt_lines(kind: str, found: dict, example: str) -> list:
    """One description prompt's headlines, label shares per (position, source state) and controls."""
    labels = ("e1", "e2", "e3", "other")
    lines = [f"## Prompt `{kind}`", "", f"Example (first item): `{example!r}`", "",
             "| read from the state | all items | answered right | answered wrong |", "|---|---|---|---|"]
    lines += [f"| {name.replace('_at_', ' at ')} | " + " | ".join(_readable_cell(groups[g]) for g in groups) + " |"
              for name, groups in found["readable"].items()]
    lines += ["", "Share of items whose generation names e1 / e2 / e3 / none of them (at any target state), and whose "
              "generation the patch changed (from the unpatched placeholder prompt's), per source state:", "",
              "| position | source state | e1 | e2 | e3 | other | changed |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {position} | {c['source']} | " + " | ".join(_share(c[label]) for label in (*labels, "changed")) + " |"
              for position, entries in found["by_source"].items() for c in entries]
    lines += ["", "Controls, unpatched: the prompt with e1's, e2's or e3's name written in place of the placeholder, "
              "or with the placeholder itself:", "", "| written | e1 | e2 | e3 | other |", "|---|---|---|---|---|"]
    lines += [f"| {name.replace('text_', '')} | " + " | ".join(_share(shares[label]) for label in labels) + " |"
              for name, shares in found["controls"].items()]
    return lines + [""]


def patchscope_markdown(results: dict, label: str) -> str:
    """Headlines (e2 at t1, e3 at t2, split by the unpatched answer), per-cell label shares and controls."""
    summary = results["summary"]
    questions = summary["question_labels"]
    lines = [f"# Patchscopes: {label}", "",
             f"Model: `{results['model']}`; {summary['n']} questions from {', '.join(results['tests'])}; description "
             f"prompts rendered as {results['render']}; source states {results['source_states']} written into the "
             f"placeholder at target state {results['target_state']} ({results['pairs']} pairs).", "",
             f"- Unpatched two-hop replies: {_rate(summary['accuracy'])} correct ({summary['right']} right, "
             f"{summary['wrong']} wrong); they name first e1 {_share(questions['e1'])}, e2 {_share(questions['e2'])}, "
             f"e3 {_share(questions['e3'])}, none of them {_share(questions['other'])}.", "",
             "A generation's first line is classified by the entity of its item it names first (grader alias "
             "matching; a name inside another's mention does not count). \"e2 at t1\" = the share of items whose t1 "
             "state names e2 at some source state (any target) while the unpatched placeholder prompt does not, "
             "with the earliest such state (0 = embeddings). Read it beside the controls: where the prompt with "
             "e1's name written already names e2, the target model makes the hop itself, and e2 read from t1 need "
             "not have been resolved in the two-hop prompt. (source, target) pairs: results.json.", ""]
    for kind, found in summary["prompts"].items():
        lines += _patchscope_prompt_lines(kind, found, results["prompt_examples"].get(kind, ""))
    lines += [f"Parity check (hooks that do nothing; largest logit difference): {results['parity']}; "
              f"self-Patchscope identity checked on {results['self_check']} replies.", ""]
    return "\n".join(lines)


def patchscope_plot(summary: dict, title: str) -> bytes:
    """Per prompt (rows) and position (columns): the share of items naming e1 / e2 / e3 per source state
    (any target), the share the unpatched placeholder prompt names (dashed, where above 0) and the share
    of generations the patch changed (dotted)."""
    kinds = list(summary["prompts"])
    positions = sorted({p for found in summary["prompts"].values() for p in found["by_source"]})
    figure, axes = plt.subplots(max(len(kinds), 1), max(len(positions), 1), squeeze=False, dpi=100,
                                figsize=(4.2 * max(len(positions), 1), 3.2 * max(len(kinds), 1)))
    for row, kind in enumerate(kinds):
        for column, position in enumerate(positions):
            axis, cells = axes[row][column], summary["prompts"][kind]["by_source"].get(position, [])
            unpatched = summary["prompts"][kind]["controls"]["placeholder"]
            for entity in ("e1", "e2", "e3", "changed"):
                line = axis.errorbar([c["source"] for c in cells], [c[entity]["rate"] for c in cells],
                                     yerr=[c[entity]["se"] for c in cells], marker="o", capsize=3, label=entity,
                                     **({"linestyle": "dotted", "color": "grey"} if entity == "changed" else {}))
                if entity != "changed" and unpatched[entity]["rate"]:
                    axis.axhline(unpatched[entity]["rate"], linestyle="dashed", linewidth=1, alpha=0.6,
                                 color=line.lines[0].get_color())
            axis.set_xticks([c["source"] for c in cells])
            axis.set_ylim(-0.05, 1.05)
            axis.set_xlabel(f"source state at {position} (0 = embeddings)")
            axis.set_ylabel("share of items naming")
            axis.set_title(f"{kind} prompt, {position}", fontsize=9)
            axis.legend(fontsize=8)
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
