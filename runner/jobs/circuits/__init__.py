"""circuits: circuit discovery per attention head and MLP (`twohop.interp.circuits`), before and after a fine-tune.

- `circuits_<setting>` (spouses, samedoc and each semi-synthetic type): the two-hop no-CoT questions
  (e1 swapped for another person's e1 of the same token length; e3 vs e3') and the CoT questions up to the
  bridge in the gold chain (the chain's first hop: e2 vs e2') and, on request (`tasks`), the in-context
  questions of spouses and samedoc (the facts in the prompt, e1 swapped for a distractor's), on
  finetune_<setting>'s model ("after") and,
  with `compare_base` (on by default), on finetune_base's model ("before", the tiny model's pretraining; a
  real model as it is).
- `circuits_ioi_<family>`: the IOI families' test rows (`generate_data_ioi`: each row's corrupted prompt
  swaps the answer's and the foil's names) on what finetune_ioi starts from ("before": finetune_base's model,
  the tiny model's pretraining; a real model as it is) and, with `compare_finetune`, on
  finetune_ioi_<family>'s model ("after"); by default the family and 2-object IOI (the old task).

Per model and task: attribution patching of every component, exact patching of the best `exact_top`, the
faithfulness curve of the top k (the rest mean-ablated), accuracy with the top set ablated; "after" is
also run with each task's "before" top set ablated (are the old circuit's components still necessary?).
With `edges`, edge attribution (EAP, `twohop.interp.edges`) between components too. Every model starts
with the component hooks' parity check. Writes scores.jsonl (one row per model, task and component),
edges.jsonl (one per model, task and edge), results.json, summary.md, heatmaps.png, faithfulness.png
and, where there are two models, overlap.png.
"""
import time
from dataclasses import dataclass
from typing import Literal

import torch

from models import load_model
from runner.config import option
from runner.errors import UserError
from runner.files import atomic_write_bytes, atomic_write_json, atomic_write_jsonl, atomic_write_text
from runner.progress import item_bar
from runner.registry import Job, SubJob
from twohop.data import ioi, tables
from twohop.data.dataset import in_context_tests, two_hop_tests
from twohop.data.records import read_records
from twohop.interp import circuits, contrasts, edges, patching
from twohop.interp.hooks import Batch
from twohop.reports import circuits as report
from twohop.training.recipes import setting_data, trained_or_given

SETTINGS = setting_data()
FAMILIES = tuple(ioi.families())
TWO_HOP_TASKS = ("nocot", "cot", "in_context")
TASKS_HELP = ("nocot: the answer e3 vs e3'; cot: the chain's bridge e2 vs e2' (prompt + gold chain up to e2); "
              "in_context: facts in the prompt, e1 swapped for a distractor person's (spouses and samedoc data only)")


@dataclass
class Common:
    top_k: int = option(5, "size of the top set: faithfulness, ablation, before-vs-after overlap", minimum=1)
    exact_top: int = option(20, "exact patching of the best components by |attribution| (0: all)", minimum=0)
    max_items: int = option(0, "at most this many clean/corrupted pairs per task (0: all)", minimum=0)
    batch_size: int = option(16, "pairs per forward pass", minimum=1)
    edges: bool = option(True, "edge attribution (EAP) between components; pre-norm families only (llama, gpt2, ...)")


@dataclass
class TwoHopConfig(Common):
    setting: Literal[tuple(SETTINGS)] = option("spouses", "the fine-tuning setting: finetune_<setting>'s model on its "
                                               "dataset's two-hop questions")
    tasks: list[Literal[TWO_HOP_TASKS]] = option(["nocot", "cot"], TASKS_HELP)
    model_from: Literal["finetune", "cli"] = option("finetune", "finetune: finetune_<setting>'s model; cli: --model "
                                                    "as it is")
    compare_base: bool = option(True, "also run on finetune_base's model (before) and compare")
    pair_seed: int = option(0, "seed of each question's choice of corrupting e1 (same token length)")


@dataclass
class IoiConfig(Common):
    family: Literal[FAMILIES] = option("3obj", "the IOI family whose fine-tune is compared (finetune_ioi_<family>)")
    tasks: list[Literal[FAMILIES]] = option(["3obj", "2obj"], "IOI families (test rows) to discover circuits on")
    compare_finetune: bool = option(False, "also run on finetune_ioi_<family>'s model (after) and compare")


def two_hop_requires(config: dict) -> list:
    needs = [SETTINGS[config["setting"]]]
    needs += [f"finetune_{config['setting']}"] if config["model_from"] == "finetune" else []
    return needs + (["finetune_base"] if config["compare_base"] else [])


def check_two_hop(config: dict, model=None) -> None:
    if config["compare_base"] and config["model_from"] != "finetune":
        raise UserError("compare_base: compares finetune_base's model with finetune_<setting>'s; with model_from=cli "
                        "give --set compare_base=false")
    if not config["tasks"]:
        raise UserError("tasks: empty; give nocot and/or cot, e.g. --set tasks=[nocot]")


def two_hop_tasks(ctx) -> tuple:
    """({label: model path} (before first), {task: rows by test file}, item maker per task)."""
    config = ctx.config
    data = ctx.input(SETTINGS[config["setting"]]) / "data"
    after = ctx.input(f"finetune_{config['setting']}") / "model" if config["model_from"] == "finetune" \
        else ctx.model.path
    models = {"before": trained_or_given(ctx.input("finetune_base"), ctx.model.path)} if config["compare_base"] else {}
    makers = {"nocot": patching.no_cot_item, "cot": contrasts.chain_item}

    def items(tokenizer, task):
        if task == "in_context":
            return contrasts.in_context_items(tokenizer, in_context_tests(data), config["max_items"])
        return patching.pair_items(tokenizer, two_hop_tests(data, task), config["pair_seed"], config["max_items"],
                                   makers[task])
    return {**models, "after" if models else "model": after}, {t: items for t in config["tasks"]}


def ioi_requires(config: dict) -> list:
    return ["generate_data_ioi", "finetune_base"] + (
        [f"finetune_ioi_{config['family']}"] if config["compare_finetune"] else [])


def ioi_tasks(ctx) -> tuple:
    config, data = ctx.config, ctx.input("generate_data_ioi") / "data"
    # Before = what the IOI fine-tune starts from: the tiny model's pretraining, or a real model as it is.
    models = {"before": trained_or_given(ctx.input("finetune_base"), ctx.model.path)}
    if config["compare_finetune"]:
        models["after"] = ctx.input(f"finetune_ioi_{config['family']}") / "model"

    def items(tokenizer, task):
        return contrasts.ioi_items(tokenizer, read_records(data / "test" / f"{task}.jsonl"), config["max_items"])
    return models, {t: items for t in config["tasks"]}


def discover_model(ctx, label: str, path, tasks: dict, before: dict) -> tuple:
    """({task: discovery}, {task: seconds}, parity) of one model; with `before` ({task: discovery}), each
    task also runs with every before-task's top set mean-ablated."""
    config = ctx.config
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(path, device)
    ctx.log.info("%s: model %s on %s", label, path, device)
    found, seconds, parity = {}, {}, None
    ablate = {f"before's top {config['top_k']} on {t}": d["top"] for t, d in before.items()}
    for task, make in tasks.items():
        start = time.monotonic()
        items, skipped = make(tokenizer, task)
        if not items:
            raise UserError(f"task {task}: no clean/corrupted pair could be built ({skipped} rows skipped)")
        if parity is None:
            parity = circuits.parity_check(model, Batch.left_padded([i.clean for i in items[:config["batch_size"]]],
                                                                    tokenizer.pad_token_id, device))
        found[task] = {**circuits.discover(model, items, tokenizer.pad_token_id, config["batch_size"], config["top_k"],
                                           config["exact_top"], ablate, item_bar(f"{label} {task}", "pass")),
                       "skipped": skipped}
        if config["edges"]:
            found[task]["edges"] = edges.summarise(edges.edge_scores(model, items, tokenizer.pad_token_id,
                                                                     config["batch_size"]), found[task]["effect"])
        seconds[task] = time.monotonic() - start
        ctx.log.info("%s %s: %d items, effect %.3f, top %s (%.0f s)", label, task, len(items), found[task]["effect"],
                     found[task]["top"], seconds[task])
    return found, seconds, (model, parity)


def compare(by_model: dict, tasks: list, top_k: int) -> dict:
    """Per task, before vs after: the components' comparison and, where edges were scored, the edges'
    (their top 2 * top_k)."""
    out = {}
    for task in tasks:
        before, after = by_model["before"][task], by_model["after"][task]
        out[task] = circuits.compare(before, after, top_k)
        if "edges" in before:
            out[task]["edges"] = edges.compare(before["edges"], after["edges"], 2 * top_k)
    return out


def run_circuits(ctx, plan) -> dict:
    models, tasks = plan(ctx)
    by_model, seconds, parity, rows, edge_rows = {}, {}, {}, [], []
    for label, path in models.items():
        found, took, (model, parity[label]) = discover_model(ctx, label, path, tasks, by_model.get("before", {}))
        by_model[label] = found
        for task, discovery in found.items():
            seconds.setdefault(task, {})[label] = took[task]
            rows += circuits.score_rows(model, discovery, {"model": label, "task": task})
            edge_rows += [{"model": label, "task": task, **edge} for edge in discovery.get("edges", [])]
    shape = (model.config.num_hidden_layers, circuits.n_heads(model))
    comparison = compare(by_model, list(tasks), ctx.config["top_k"]) if len(models) == 2 else {}
    for found in (f for by_task in by_model.values() for f in by_task.values()):
        found["top_edges"] = found.pop("edges", [])[:2 * ctx.config["top_k"]]
    results = {"models": {k: str(v) for k, v in models.items()}, "parity": parity, "seconds": seconds,
               "tasks": {t: {label: by_model[label][t] for label in models} for t in tasks}, "comparison": comparison}
    write(ctx, results, rows, edge_rows, shape)
    headline = {f"{t}_{label}_{key}": value for t in tasks for label in models
                for key, value in (("effect", by_model[label][t]["effect"]), ("top1", by_model[label][t]["top"][0]))}
    return {**headline, **{f"{t}_jaccard_top{ctx.config['top_k']}": c["jaccard"][ctx.config["top_k"]]
                           for t, c in comparison.items()}}


def write(ctx, results: dict, rows: list, edge_rows: list, shape: tuple) -> None:
    label = ctx.run.label
    atomic_write_jsonl(ctx.run_dir / "scores.jsonl", rows)
    if edge_rows:
        atomic_write_jsonl(ctx.run_dir / "edges.jsonl", edge_rows)
    atomic_write_json(ctx.run_dir / "results.json", results)
    atomic_write_text(ctx.run_dir / "summary.md", report.markdown(results, label))
    atomic_write_bytes(ctx.run_dir / "heatmaps.png", report.heat_maps(results, *shape, label))
    atomic_write_bytes(ctx.run_dir / "faithfulness.png", report.faithfulness_plot(results, label))
    if results["comparison"]:
        atomic_write_bytes(ctx.run_dir / "overlap.png", report.overlap_plot(results["comparison"], label))


def check_ioi(config: dict, model=None) -> None:
    if not config["tasks"]:
        raise UserError("tasks: empty; give IOI families, e.g. --set tasks=[2obj,3obj]")


TWO_HOP = ("spouses", "samedoc") + tuple(tables.ENTITY_TYPES)
SUBJOBS = [SubJob("circuits", setting, f"heads and MLPs carrying the two-hop answer and the CoT chain's bridge "
                  f"({setting}), before (finetune_base) and after finetune_{setting}", lambda ctx: run_circuits(
                      ctx, two_hop_tasks), TwoHopConfig,
                  {"setting": setting}, requires=two_hop_requires,
                  uses_model=True, seeded=True, check=check_two_hop) for setting in TWO_HOP]
SUBJOBS += [SubJob("circuits", f"ioi_{family}", f"heads and MLPs of IOI ({', '.join(dict.fromkeys([family, '2obj']))}) on "
                   f"the base (finetune_base; a real model as it is) and (compare_finetune) after finetune_ioi_{family}",
                   lambda ctx: run_circuits(ctx, ioi_tasks), IoiConfig,
                   {"family": family, "tasks": list(dict.fromkeys([family, "2obj"]))}, requires=ioi_requires,
                   uses_model=True, seeded=True, check=check_ioi) for family in FAMILIES]

JOB = Job("circuits", "circuit discovery per head and MLP: attribution and exact patching, faithfulness, before vs "
          "after a fine-tune", tuple(SUBJOBS))
