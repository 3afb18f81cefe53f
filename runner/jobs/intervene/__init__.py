"""intervene: causal interventions on two-hop questions, over plain hooks (twohop.interp.hooks).

Sub-jobs read the model a finetune sub-job trained (`setting`, default `spouses`: the
separate-documents model, seeded) or, with `model_from=cli`, `--model` as it is, and the two-hop
no-CoT tests of that setting's dataset. `<kind>_samedoc` and `<kind>_universities` are the same with
that setting as default, in run folders of their own (changing `setting` of one sub-job replaces its
earlier run, as any config change does). Every run starts with the hooks' parity check.
- `patch`: clean -> corrupted residual patching over states x {t1, r, t2} and attention knockout
  t2 -> e1 per layer (`twohop.interp.patching`). Writes rows.jsonl (item x layer x position),
  results.json, summary.md, patching_heatmap.png, knockout.png.
- `backpatch`: the Hopping Too Late grid (`twohop.interp.backpatching`): for every source > target
  state, the source state copied into the target at t2 (and/or t1) on the prompt pass, then greedy
  generation, graded. Rows are appended to rows.jsonl as they finish (a killed run continues);
  results.json, summary.md, backpatch.png.
- `entrec`: the DeepMind scores (`twohop.interp.entity_recall`): entity recall of e2 (logit lens at the
  end of the descriptive mention) against e1- and r1-substituted prompts (first hop), and the sign of
  the consistency score's derivative along the entity-recall gradient per state (second hop), from one
  backward pass; frequencies per state against 0.5. Writes rows.jsonl (item x state), results.json,
  summary.md, entrec.png.
- `patchscope`: Patchscopes (`twohop.interp.patchscope`): the state at t1 / t2 and each source state
  written into the placeholder of a description prompt (entity, token identity), the greedy
  generation classified e1 / e2 / e3 / other; with text controls. Rows appended as they finish;
  results.json, summary.md, patchscope.png.
- `steer`: directions per state (difference of means between two prompt sets, or a probe's) added,
  ablated or amplified at t2 / t1 on the prompt pass or every generated token
  (`twohop.interp.steering`); the effect is steered minus unsteered accuracy on held-out two-hop
  questions, their one-hop facts and chosen lm-eval tasks. Writes directions.safetensors, rows.jsonl
  (appended as interventions finish), results.json, summary.md, steering.png.
- `probe`: linear probes (`twohop.interp.probes`) per state at t1 and t2 for e2, e2's first token and
  e3, split by e1 entity, each beside a control task with shuffled labels (selectivity), and for a
  binary label (default: the reply graded correct), whose probe is saved as directions.safetensors
  for `steer`. Writes rows.jsonl (test question x target x task x seed x position x state),
  questions.jsonl (every question's labels and reply), results.json, summary.md, probes.png.
"""
from dataclasses import dataclass
from typing import Literal

import torch

from models import load_model
from runner.config import option
from runner.errors import UserError
from runner.files import (append_jsonl, atomic_write_bytes, atomic_write_json, atomic_write_jsonl, atomic_write_text,
                          resume_jsonl)
from runner.progress import item_bar
from runner.registry import Job, SubJob
from twohop.data.dataset import second_hop_tests, two_hop_tests
from twohop.interp import backpatching, entity_recall, patching, patchscope, probes, steering
from twohop.interp.directions import save_directions
from twohop.interp.hooks import Batch, n_states, parity_check
from twohop.reports import intervene as report
from twohop.training.recipes import setting_data, trained_or_given

SETTINGS = setting_data()


@dataclass
class Source:
    setting: Literal[tuple(SETTINGS)] = option("spouses", "the fine-tuning setting: finetune_<setting>'s model, "
                                               "tested on its dataset's two-hop no-CoT questions")
    model_from: Literal["finetune", "cli"] = option("finetune", "finetune: the model finetune_<setting> trained; "
                                                    "cli: --model as it is (not fine-tuned)")
    max_items: int = option(0, "at most this many questions (0: all)", minimum=0)
    batch_size: int = option(16, "questions per forward pass", minimum=1)


@dataclass
class PatchConfig(Source):
    pair_seed: int = option(0, "seed of each question's choice of corrupting e1 (same token length)")
    knockout_to: Literal["t1", "e1"] = option("t1", "knock out t2's attention to e1's last token or to all of e1")
    bootstrap: int = option(1000, "bootstrap samples of each recovered fraction's standard error", minimum=10)


@dataclass
class BackpatchConfig(Source):
    positions: list[Literal["t2", "t1"]] = option(["t2"], "where a later state is copied into an earlier layer: "
                                                  "t2 (the last prompt token) and/or t1 (e1's last token)")
    layer_stride: int = option(1, "use every n-th state as source and target (the last one always)", minimum=1)
    max_new_tokens: int = option(16, "tokens generated per reply", minimum=1)


@dataclass
class PatchscopeConfig(Source):
    positions: list[Literal["t1", "t2"]] = option(["t1", "t2"], "the two-hop prompt positions whose states are "
                                                  "decoded: t1 (e1's last token), t2 (the last prompt token)")
    source_states: list[int] = option([], "residual states read there (0 = embeddings, i = decoder layer i's "
                                      "output); empty: all", minimum=0)
    target_state: Literal["same", "all"] | int = option("same", "the description prompt's state a source state is "
                                                        "written into: same (= the source state), all (every state, "
                                                        "read as any), or a fixed state", minimum=0)
    prompts: list[Literal["entity", "identity"]] = option(["entity", "identity"], "description prompts: entity "
                                                          "(entity description) and/or identity (token identity)")
    render: Literal["auto", "chat", "raw"] = option("auto", "description prompts as a chat user turn or raw text "
                                                    "after BOS; auto: chat where the tokenizer has a chat template")
    max_new_tokens: int = option(10, "tokens generated per description and per unpatched reply (Hopping Too Late: 10)",
                                minimum=1)


@dataclass
class SteerConfig(Source):
    contrast: Literal[tuple(steering.CONTRASTS)] = option(
        "correct_wrong", "directions_from=means: the two prompt sets whose difference of mean states is the direction "
        "(first minus second): two-hop questions answered right - wrong, with - without the CoT instruction, "
        "two-hop - its first hop, fine-tuned - base model (finetune_base)")
    directions_from: Literal["means", "probe"] = option(
        "means", "means: the contrast's difference of means; probe: the directions.safetensors of intervene_probe "
        "(intervene_probe_<setting> for samedoc / universities), which then runs first")
    positions: list[Literal["t2", "t1"]] = option(
        ["t2"], "where directions are read and applied, each on its own: t2 (the last prompt token), t1 (the last "
        "token of the entity asked about)")
    states: list[int] = option([], "residual states steered (0 = embeddings, i = decoder layer i's output; []: all)",
                               minimum=0)
    mode: Literal["add", "ablate", "amplify"] = option(
        "add", "add: state + scale x direction; ablate: its component along the direction set to 0; amplify: that "
        "component multiplied by the scale")
    scales: list[float] = option([], "add: multiples of the direction ([]: -4,-2,-1,1,2,4); amplify: factors of its "
                                 "component ([]: -1,0.5,2,4); ablate takes none")
    scale_unit: Literal["direction", "state_norm"] = option(
        "direction", "add's unit: the direction as it is (1 moves the second set's mean onto the first's), or the unit "
        "direction times the mean norm of that state over the graded questions")
    when: Literal["prompt", "every_token"] = option("prompt", "steer the prompt pass only, or every generated token too")
    heldout: bool = option(True, "directions from half of the people (seeded), effect graded on the other half; "
                           "false: both on every question (in-sample)")
    max_new_tokens: int = option(16, "tokens generated per reply (a steer towards CoT makes replies that reason "
                                 "before answering: give them room, e.g. 96, or they are cut before the answer)", minimum=1)
    lm_eval_tasks: list[str] = option([], "tasks the evaluation exports for this setting (e.g. "
                                      "twohop_spouses_test_2hop_nocot), run through lm-eval with the hooks (t2 only)")
    lm_eval_limit: int = option(20, "lm-eval rows per task (of the held-out people)", minimum=1)


@dataclass
class ProbeConfig(Source):
    targets: list[Literal[probes.TARGETS]] = option(list(probes.TARGETS), "what the probes read: e2 (the bridge), "
                                                    "e2_first_token (its first token: a class several e2 share), e3")
    positions: list[Literal[probes.POSITIONS]] = option(list(probes.POSITIONS), "where states are probed: t1 (e1's "
                                                        "last token) and/or t2 (the last prompt token)")
    label: str = option("correct", "a binary label probed too and saved as a direction per state for steer: correct "
                        "(the greedy reply graded right), a field of the test rows (true where set, not empty or 0), "
                        "or '' (none)")
    direction_position: Literal[probes.POSITIONS] = option("t2", "the position the label's direction is fitted at")
    split_seeds: int = option(5, "random entity splits; headlines are means over them", minimum=2)
    test_fraction: float = option(0.3, "the most questions held out per split (whole e1 entities, classes kept)",
                                  minimum=0.05, maximum=0.95)
    l2: float = option(1.0, "penalty l2/2 ||W||^2 beside the summed cross-entropy on standardised states "
                       "(1: scikit-learn's C = 1)", minimum=1e-6)
    min_class: int = option(10, "fewest questions in each class of `label` to probe it and save its direction",
                            minimum=2)
    max_new_tokens: int = option(16, "tokens generated per reply, to grade label=correct", minimum=1)


def requires(config: dict) -> list:
    data = [SETTINGS[config["setting"]]]
    out = data + [f"finetune_{config['setting']}"] if config["model_from"] == "finetune" else data
    if config.get("directions_from") == "probe":
        out.append(probe_subjob(config["setting"]))
    elif config.get("contrast") == "finetuned_base":
        out.append("finetune_base")
    return out


def load(ctx, eager: bool) -> tuple:
    """(model, tokenizer, {test: rows}, the model's path) of the run's setting, on the GPU if there is one."""
    path = ctx.input(f"finetune_{ctx.config['setting']}") / "model" if ctx.config["model_from"] == "finetune" \
        else ctx.model.path
    device = "cuda" if torch.cuda.is_available() else "cpu"  # bf16 there: the parity check's tolerance follows
    model, tokenizer = load_model(path, device, attn_implementation="eager" if eager else None)
    ctx.log.info("model %s on %s", path, device)
    return model, tokenizer, two_hop_tests(ctx.input(SETTINGS[ctx.config["setting"]]) / "data"), str(path)


def run_patch(ctx) -> dict:
    config = ctx.config
    model, tokenizer, tests, path = load(ctx, eager=True)
    items, skipped = patching.pair_items(tokenizer, tests, config["pair_seed"], config["max_items"])
    if not items:
        raise UserError(f"no question of {', '.join(tests)} has a partner whose e1 has as many tokens; nothing to patch")
    parity = parity_check(model, Batch.left_padded([i.clean for i in items[:config["batch_size"]]],
                                                   tokenizer.pad_token_id), range(1, n_states(model)))
    ctx.log.info("parity check passed (%s); %d items, %d skipped", parity, len(items), skipped)
    rows = patching.sweep(model, items, tokenizer.pad_token_id, config["batch_size"], config["knockout_to"],
                          item_bar("patch"))
    summary = patching.summarise(rows, config["bootstrap"])
    results = {"model": path, "tests": list(tests), "skipped": skipped, "parity": parity, "summary": summary}
    atomic_write_jsonl(ctx.run_dir / "rows.jsonl", rows)
    atomic_write_json(ctx.run_dir / "results.json", results)
    atomic_write_text(ctx.run_dir / "summary.md", report.patch_markdown(results, ctx.run.label))
    atomic_write_bytes(ctx.run_dir / "patching_heatmap.png", report.heat_map(summary, ctx.run.label))
    atomic_write_bytes(ctx.run_dir / "knockout.png", report.knockout_plot(summary, ctx.run.label))
    return {"n": summary["n"], "skipped": skipped, "effect": summary["effect"]["mean"],
            "effect_se": summary["effect"]["se"]}


def check_backpatch(config: dict, model=None) -> None:
    if not config["positions"]:
        raise UserError("positions: empty; give t2 and/or t1, e.g. --set positions=[t2,t1]")


def run_backpatch(ctx) -> dict:
    config = ctx.config
    model, tokenizer, tests, path = load(ctx, eager=False)
    queries = backpatching.queries(tokenizer, tests, config["max_items"])
    parity = parity_check(model, Batch.left_padded([q.ids for q in queries[:config["batch_size"]]],
                                                   tokenizer.pad_token_id))
    pairs = backpatching.layer_pairs(n_states(model), config["layer_stride"])
    rows = resume_jsonl(ctx.run_dir / "rows.jsonl")
    ctx.log.info("parity check passed (%s); %d questions x %d pairs x %s; %d rows done before", parity,
                 len(queries), len(pairs), config["positions"], len(rows))
    update, total = item_bar("backpatch"), len(queries) * (1 + len(pairs) * len(config["positions"]))
    for chunk in backpatching.grid_rows(model, tokenizer, queries, pairs, config["positions"], config["batch_size"],
                                        config["max_new_tokens"], {backpatching.row_key(r) for r in rows}):
        append_jsonl(ctx.run_dir / "rows.jsonl", chunk)
        rows += chunk
        update(len(rows), total)
    summary = backpatching.summarise(rows)
    results = {"model": path, "tests": list(tests), "positions": config["positions"], "pairs": len(pairs),
               "layer_stride": config["layer_stride"], "parity": parity, "summary": summary}
    atomic_write_json(ctx.run_dir / "results.json", results)
    atomic_write_text(ctx.run_dir / "summary.md", report.backpatch_markdown(results, ctx.run.label))
    atomic_write_bytes(ctx.run_dir / "backpatch.png", report.backpatch_plot(summary, n_states(model), ctx.run.label))
    best = summary["best_pair"]
    return {"n": summary["n"], "accuracy": summary["accuracy"]["rate"], "oracle_fix": summary["oracle_fix"]["any"]["rate"],
            "best_pair_fix": best["fix"]["rate"] if best else None,
            "best_pair_preserve": best["preserve"]["rate"] if best else None}


# r1 substitutes for the shipped questions' relation words (the first found in the mention is swapped): other
# relations' words that the tiny models' tokenizer holds as single tokens, so the swapped prompt has no unseen
# token. A substitute also changes what the lens predicts next for any name (see twohop.interp.entity_recall).
RELATION_SWAPS = {"husband or wife": "architect", "wedded partner": "architect", "marriage partner": "architect",
                  "spouse": "architect", "married": "designed", "wed": "designed", "favorite": "designed"}


@dataclass
class EntrecConfig(Source):
    pair_seed: int = option(0, "seed of each question's choice of substituting e1 (one whose e2 starts with "
                            "another token)")
    relation_swaps: dict[str, str] = option(RELATION_SWAPS, "r1 substitution: the first of these words found in the "
                                            "descriptive mention (outside e1) is replaced by its value; questions "
                                            "with none get no r1 comparison")


def check_entrec(config: dict, model=None) -> None:
    swaps = config["relation_swaps"]
    if not swaps or any(not old.strip() or old == new for old, new in swaps.items()):
        raise UserError(f"relation_swaps: {swaps}: give words to swap for other words, e.g. "
                        "--set 'relation_swaps={spouse: architect}'")


def run_entrec(ctx) -> dict:
    config = ctx.config
    model, tokenizer, tests, path = load(ctx, eager=False)
    one_hop = second_hop_tests(ctx.input(SETTINGS[config["setting"]]) / "data")
    items, skipped = entity_recall.build_items(tokenizer, tests, one_hop, config["relation_swaps"],
                                               config["pair_seed"], config["max_items"])
    if not items:
        raise UserError(f"no question of {', '.join(tests)} has a one-hop question about its e2 in "
                        f"{', '.join(one_hop) or 'the dataset (it has no second-hop test)'}")
    parity = parity_check(model, Batch.left_padded([i.prompt.ids for i in items[:config["batch_size"]]],
                                                   tokenizer.pad_token_id))
    ctx.log.info("parity check passed (%s); %d items, skipped %s", parity, len(items), skipped)
    rows = entity_recall.sweep(model, items, tokenizer.pad_token_id, config["batch_size"], item_bar("entrec"))
    summary = entity_recall.summarise(rows)
    results = {"model": path, "tests": list(tests), "one_hop_tests": list(one_hop), "skipped": skipped,
               "relation_swaps": config["relation_swaps"], "parity": parity, "summary": summary}
    atomic_write_jsonl(ctx.run_dir / "rows.jsonl", rows)
    atomic_write_json(ctx.run_dir / "results.json", results)
    atomic_write_text(ctx.run_dir / "summary.md", report.entrec_markdown(results, ctx.run.label))
    atomic_write_bytes(ctx.run_dir / "entrec.png", report.entrec_plot(summary, ctx.run.label))
    best = summary["best"]
    return {"n": summary["n"], **{f"{m}_max": e["frequency"] if e else None for m, e in best.items()},
            **{f"{m}_max_state": e["state"] if e else None for m, e in best.items()}}


def check_patchscope(config: dict, model=None) -> None:
    for key, example in (("positions", "[t1,t2]"), ("prompts", "[entity,identity]")):
        if not config[key]:
            raise UserError(f"{key}: empty; give at least one, e.g. --set {key}={example}")


def run_patchscope(ctx) -> dict:
    config = ctx.config
    model, tokenizer, tests, path = load(ctx, eager=False)
    queries = backpatching.queries(tokenizer, tests, config["max_items"])
    if not queries:
        raise UserError(f"no two-hop question in {', '.join(tests) or 'the tests'}; nothing to decode")
    pairs = patchscope.state_pairs(n_states(model), config["source_states"], config["target_state"])
    states = sorted({source for source, _ in pairs})
    parity = parity_check(model, Batch.left_padded([q.ids for q in queries[:config["batch_size"]]],
                                                   tokenizer.pad_token_id))
    checked = patchscope.self_check(model, tokenizer, queries[0], config["positions"], states, config["max_new_tokens"])
    style = patchscope.render_style(tokenizer, config["render"])
    described = patchscope.descriptions(tokenizer, queries, config["prompts"], style)
    rows = resume_jsonl(ctx.run_dir / "rows.jsonl")
    ctx.log.info("parity check passed (%s), self-Patchscope identity on %d replies; %d questions x %s x %d (source, "
                 "target) state pairs, %s prompts; %d rows done before", parity, checked, len(queries),
                 config["positions"], len(pairs), style, len(rows))
    update = item_bar("patchscope")
    total = len(queries) * (1 + len(config["prompts"]) * (4 + len(config["positions"]) * len(pairs)))
    for chunk in patchscope.scope_rows(model, tokenizer, queries, described, config["positions"], pairs,
                                       config["batch_size"], config["max_new_tokens"],
                                       {patchscope.row_key(r) for r in rows}):
        append_jsonl(ctx.run_dir / "rows.jsonl", chunk)
        rows += chunk
        update(len(rows), total)
    summary = patchscope.summarise(rows)
    results = {"model": path, "tests": list(tests), "render": style, "target_state": config["target_state"],
               "source_states": states, "pairs": len(pairs), "parity": parity, "self_check": checked,
               "prompt_examples": patchscope.example_prompts(tokenizer, described), "summary": summary}
    atomic_write_json(ctx.run_dir / "results.json", results)
    atomic_write_text(ctx.run_dir / "summary.md", report.patchscope_markdown(results, ctx.run.label))
    atomic_write_bytes(ctx.run_dir / "patchscope.png", report.patchscope_plot(summary, ctx.run.label))
    return {"n": summary["n"], "accuracy": summary["accuracy"]["rate"],
            **{f"{kind}_{name}": entry["all"]["rate"] for kind, found in summary["prompts"].items()
               for name, entry in found["readable"].items()}}


def check_steer(config: dict, model=None) -> None:
    refusals = [(not config["positions"], "positions: empty; give t2 and/or t1"),
                (config["mode"] == "ablate" and config["scales"], "scales: ablate sets the component to 0 and takes none"),
                (config["mode"] != "add" and config["scale_unit"] != "direction", "scale_unit: only add has a unit"),
                (config["directions_from"] == "probe" and config["contrast"] != "correct_wrong",
                 "contrast: the probe's directions are read from its file; the contrast applies to directions_from=means"),
                (config["contrast"] == "finetuned_base" and config["model_from"] == "cli",
                 "contrast=finetuned_base compares finetune_<setting>'s model with its base; it needs model_from=finetune"),
                (config["lm_eval_tasks"] and "t2" not in config["positions"],
                 "lm_eval_tasks: lm-eval builds its own batches, where only t2 is known; add t2 to positions")]
    for refused, why in refusals:
        if refused:
            raise UserError(why)


def probe_subjob(setting: str) -> str:
    return f"intervene_probe_{setting}" if setting in COMPARED else "intervene_probe"


def steer_inputs(ctx, model, tokenizer) -> tuple:
    """(base model or None, directions file or None, parity check): what the directions come from besides
    the model; the parity check runs on every model read."""
    config, base, directions = ctx.config, None, None
    if config["directions_from"] == "probe":
        directions = ctx.input(probe_subjob(config["setting"])) / "directions.safetensors"
    elif config["contrast"] == "finetuned_base":
        base = load_model(trained_or_given(ctx.input("finetune_base"), ctx.model.path), model.device)[0]
    batch = Batch.left_padded([q.ids for q in backpatching.queries(tokenizer, two_hop_tests(
        ctx.input(SETTINGS[config["setting"]]) / "data"), config["batch_size"])], tokenizer.pad_token_id, model.device)
    parity = {name: parity_check(m, batch) for name, m in (("model", model), ("base", base)) if m is not None}
    return base, directions, parity


def run_steer(ctx) -> dict:
    config = ctx.config
    model, tokenizer, tests, path = load(ctx, eager=False)
    base, directions_file, parity = steer_inputs(ctx, model, tokenizer)
    plan = steering.prepare(model, tokenizer, ctx.input(SETTINGS[config["setting"]]) / "data", config, ctx.seed, base,
                            directions_file, ctx.run_dir / "lm_eval_tasks")
    files = {} if directions_file else steering.save_fitted(plan, config["contrast"], ctx.run_dir)
    rows = steering.complete(resume_jsonl(ctx.run_dir / "rows.jsonl"), plan.per_condition())
    atomic_write_jsonl(ctx.run_dir / "rows.jsonl", rows)
    done = {steering.row_key(r) for r in rows}
    ctx.log.info("parity check passed (%s); %d interventions, %d done before", parity, len(plan.steers), len(done))
    update = item_bar("steer")
    for chunk in steering.grid_rows(model, tokenizer, plan.steers, plan.graded, plan.unsteered, plan.lm_eval,
                                    config["batch_size"], config["max_new_tokens"], done):
        append_jsonl(ctx.run_dir / "rows.jsonl", chunk)
        rows += chunk
        update(len({steering.row_key(r) for r in rows}), len(plan.steers))
    summary = steering.summarise(rows, plan.unsteered)
    results = {"model": path, "tests": list(tests), "config": config, "directions_files": files,
               "directions_source": str(directions_file or "difference of means"), "parity": parity,
               "norms": steering.norms(plan), "skipped_states": plan.skipped, "summary": summary}
    atomic_write_json(ctx.run_dir / "results.json", results)
    atomic_write_text(ctx.run_dir / "summary.md", report.steer_markdown(results, ctx.run.label))
    atomic_write_bytes(ctx.run_dir / "steering.png", report.steer_plot(summary, ctx.run.label))
    return steering.headline(summary)


def check_probe(config: dict, model=None) -> None:
    if not config["positions"]:
        raise UserError("positions: empty; give t1 and/or t2, e.g. --set positions=[t1,t2]")
    if not config["targets"] and not config["label"]:
        raise UserError("targets is empty and label is '': nothing to probe")
    if config["label"] in (*probes.TARGETS, "item", "e1", "test", "reply", "rule"):
        raise UserError(f"label {config['label']!r} is a target or a question field, not a binary label; "
                        "e.g. --set label=correct")


def run_probe(ctx) -> dict:
    config, label = ctx.config, ctx.config["label"]
    model, tokenizer, tests, path = load(ctx, eager=False)
    queries = backpatching.queries(tokenizer, tests, config["max_items"])
    parity = parity_check(model, Batch.left_padded([q.ids for q in queries[:config["batch_size"]]],
                                                   tokenizer.pad_token_id))
    states = probes.question_states(model, queries, tokenizer.pad_token_id, config["batch_size"])
    graded = probes.graded_replies(model, tokenizer, queries, config["batch_size"], config["max_new_tokens"]) \
        if label == "correct" else ()
    items = probes.question_labels(tokenizer, queries, config["targets"], label, graded)
    refused = probes.label_refusal(items, label, config["min_class"]) if label else None
    targets = config["targets"] + ([label] if label and not refused else [])
    ctx.log.info("parity check passed (%s); %d questions; probing %s%s", parity, len(items), targets,
                 f"; {refused}" if refused else "")
    rows = probes.sweep({p: states[p] for p in config["positions"]}, items, targets, config["split_seeds"],
                        config["test_fraction"], config["l2"], item_bar("probe"))
    summary = probes.summarise(rows, items, targets, config["positions"])
    direction = None
    if label and not refused:
        direction = ctx.run_dir / "directions.safetensors"
        save_directions(direction, probes.probe_direction(states[config["direction_position"]],
                                                          [item[label] for item in items], label, config["l2"]),
                        "probe", config["direction_position"], " - ".join(probes.binary_values(label)))
    results = {"model": path, "tests": list(tests), "questions": len(items), "parity": parity,
               **{key: config[key] for key in ("positions", "split_seeds", "test_fraction", "l2")},
               "label": {"name": label, "refused": refused, "direction": direction and direction.name,
                         "position": config["direction_position"],
                         "counts": probes.label_counts(items, label) if label else {}},
               "headline": probes.headline(summary), "summary": summary}
    atomic_write_jsonl(ctx.run_dir / "rows.jsonl", rows)
    atomic_write_jsonl(ctx.run_dir / "questions.jsonl", items)
    atomic_write_json(ctx.run_dir / "results.json", results)
    atomic_write_text(ctx.run_dir / "summary.md", report.probe_markdown(results, ctx.run.label))
    atomic_write_bytes(ctx.run_dir / "probes.png", report.probe_plot(summary, ctx.run.label))
    return {"n": len(items), **{f"first_{key}": entry["first_decodable"]
                                for key, entry in results["headline"].items()}, "label_refused": bool(refused)}


# The settings compared with the default (spouses: facts in separate documents), each with its own run
# folders: both facts in one document, and a semi-synthetic type (fact B from pretraining).
COMPARED = ("samedoc", "universities")
KINDS = (("patch", "clean -> corrupted residual patching over layers x {t1, r, t2}, attention knockout t2 -> e1 "
          "per layer", run_patch, PatchConfig, None),
         ("backpatch", "back-patching (Hopping Too Late): later states copied into earlier layers at t2 / t1, greedy "
          "replies graded; oracle and best-pair fix rates", run_backpatch, BackpatchConfig, check_backpatch),
         ("entrec", "entity recall of e2 at the descriptive mention vs e1-/r1-substituted prompts, and the "
          "consistency score's derivative along the entity-recall gradient per layer (Yang et al. 2024)", run_entrec,
          EntrecConfig, check_entrec),
         ("patchscope", "Patchscopes: states at t1 / t2 patched into description prompts, the generation classified "
          "e1 / e2 / e3 / other; e2 at t1 and e3 at t2 per layer, split by the unpatched answer", run_patchscope,
          PatchscopeConfig, check_patchscope),
         ("steer", "steering along per-state directions (difference of means or a probe's): add / ablate / amplify, "
          "steered - unsteered accuracy on two-hop, one-hop and lm-eval tasks", run_steer, SteerConfig, check_steer),
         ("probe", "linear probes per state at t1 / t2 for e2 and e3 (split by entity, beside a shuffled-label "
          "control) and a binary label saved as a steering direction", run_probe, ProbeConfig, check_probe))


def subjob(kind: str, help: str, run, config, check, setting: str = "") -> SubJob:
    return SubJob("intervene", f"{kind}_{setting}" if setting else kind, help + f" ({setting or 'spouses'})", run,
                  config, {"setting": setting} if setting else {}, requires=requires, uses_model=True, seeded=True,
                  check=check)


JOB = Job("intervene", "causal interventions on two-hop questions: activation patching, knockout, back-patching, "
          "Patchscopes",
          tuple(subjob(*kind) for kind in KINDS) + tuple(subjob(*kind, s) for kind in KINDS for s in COMPARED))
