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
- `probe`: linear probes (`twohop.interp.probes`) per state at t1 and t2 for e2, e2's first token and
  e3, split by e1 entity, each beside a control task with shuffled labels (selectivity), and for a
  binary label (default: the reply graded correct), whose probe is saved as directions.safetensors
  for `steer`. Writes rows.jsonl (test question x target x task x seed x position x state),
  questions.jsonl (every question's labels and reply), results.json, summary.md, probes.png.
"""
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm

from models import load_model
from runner.config import option
from runner.errors import UserError
from runner.files import (append_jsonl, atomic_write_bytes, atomic_write_json, atomic_write_jsonl, atomic_write_text,
                          resume_jsonl)
from runner.registry import Job, SubJob
from twohop.data.dataset import two_hop_tests
from twohop.interp import backpatching, patching, probes
from twohop.interp.directions import save_directions
from twohop.interp.hooks import Batch, n_states, parity_check
from twohop.reports import intervene as report
from twohop.training.recipes import setting_data

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
    return data + [f"finetune_{config['setting']}"] if config["model_from"] == "finetune" else data


def load(ctx, eager: bool) -> tuple:
    """(model, tokenizer, {test: rows}, the model's path) of the run's setting, on the GPU if there is one."""
    path = ctx.input(f"finetune_{ctx.config['setting']}") / "model" if ctx.config["model_from"] == "finetune" \
        else ctx.model.path
    device = "cuda" if torch.cuda.is_available() else "cpu"  # bf16 there: the parity check's tolerance follows
    model, tokenizer = load_model(path, device, attn_implementation="eager" if eager else None)
    ctx.log.info("model %s on %s", path, device)
    return model, tokenizer, two_hop_tests(ctx.input(SETTINGS[ctx.config["setting"]]) / "data"), str(path)


def progress_bar(label: str):
    bar = tqdm(desc=label, unit="item", dynamic_ncols=True)

    def update(done, total):
        bar.total = total
        bar.update(done - bar.n)
    return update


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
                          progress_bar("patch"))
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
    update, total = progress_bar("backpatch"), len(queries) * (1 + len(pairs) * len(config["positions"]))
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
                        config["test_fraction"], config["l2"], progress_bar("probe"))
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
         ("probe", "linear probes per state at t1 / t2 for e2 and e3 (split by entity, beside a shuffled-label "
          "control) and a binary label saved as a steering direction", run_probe, ProbeConfig, check_probe))


def subjob(kind: str, help: str, run, config, check, setting: str = "") -> SubJob:
    return SubJob("intervene", f"{kind}_{setting}" if setting else kind, help + f" ({setting or 'spouses'})", run,
                  config, {"setting": setting} if setting else {}, requires=requires, uses_model=True, seeded=True,
                  check=check)


JOB = Job("intervene", "causal interventions on two-hop questions: activation patching, knockout, back-patching",
          tuple(subjob(*kind) for kind in KINDS) + tuple(subjob(*kind, s) for kind in KINDS for s in COMPARED))
