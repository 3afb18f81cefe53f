"""in_context: two-hop questions over facts given in the prompt (Experiment 3).

The model is what `finetune_base` produced: the tiny model after its pretraining (which includes
reading facts in the prompt, with 0-10 distractor triplets), or a real model as it is. Sub-jobs,
generated from the table below: `nocot` and `cot` (10 distractor triplets, data seeds 1-3, as in the
reference) and `distractor_sweep` (both styles over 0, 1, 3, 10, 30 distractors). Outputs:
results.json, predictions.jsonl, summary.md and accuracy_vs_distractors.png.

`--set 'reference_files=[...]'` grades the reference repo's in-context files instead (e.g. its
`all_in_context_test_{1,2,3}.jsonl`), with its prompt, each file a replicate, into the same outputs.
"""
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

from models import load_model
from runner.config import option
from runner.errors import UserError
from runner.registry import Job, SubJob
from twohop.data import tables
from twohop.data.reference_in_context import read_reference_in_context
from twohop.evaluation.in_context import evaluate_reference_files, evaluate_settings, is_main_process
from twohop.reports.in_context import in_context_headline, write_in_context_outputs
from twohop.training.recipes import trained_or_given


@dataclass
class InContextConfig:
    styles: list[Literal["nocot", "cot"]] = option(["nocot"], "answer directly (nocot) and/or step by step (cot)")
    distractor_counts: list[int] = option([10], "distractor triplets in the prompt, one setting each", minimum=0)
    data_seeds: list[int] = option([1, 2, 3], "seeds of the distractors and shuffles; each is a replicate")
    max_rows: int = option(0, "questions per setting and seed (0: every undemoed person)", minimum=0)
    batch_size: int = option(32, "prompts per forward pass", minimum=1)
    nocot_max_new_tokens: int = option(24, "generation length without a chain of thought", minimum=1)
    cot_max_new_tokens: int = option(96, "generation length with a chain of thought", minimum=1)
    reference_files: list[str] = option(
        [], "the reference repo's in-context test files (triplet/context/question/answer rows, e.g. its "
        "all_in_context_test_{1,2,3}.jsonl) to grade, with its prompt, instead of generate_data's world; each file is "
        "a replicate and its contexts set the distractors, so distractor_counts and data_seeds do not apply", path=True)

SETTINGS = {  # sub-job -> (help, styles, default distractor counts)
    "nocot": ("answer directly from 22 facts in the prompt (10 distractor triplets)", ["nocot"], [10]),
    "cot": ("answer step by step from 22 facts in the prompt (10 distractor triplets)", ["cot"], [10]),
    "distractor_sweep": ("no-CoT and CoT accuracy against the number of distractor triplets",
                         ["nocot", "cot"], [0, 1, 3, 10, 30]),
}


def check_config(config: dict, model=None, counts=(10,)) -> None:
    for key in ("styles", "distractor_counts", "data_seeds"):
        if not config[key]:
            raise UserError(f"{key}: empty; give at least one value, e.g. --set {key}=[...]")
    if config["reference_files"]:  # the files' contexts set both; a value given for them would be dropped
        for key, default in (("distractor_counts", list(counts)), ("data_seeds", [1, 2, 3])):
            if config[key] != default:
                raise UserError(f"{key}: does not apply with reference_files (each file is a replicate and its "
                                f"contexts set the distractors); leave it at {default}")


def read_world(ctx) -> dict:
    world = json.loads((ctx.input("generate_data_spouses") / "data" / "world.json").read_text())
    most = max(ctx.config["distractor_counts"])
    if most > len(world["demoed"]) + len(world["undemoed"]) - 1:
        raise UserError(f"distractor_counts: {most} distractors need more triplets than the world has "
                        f"({len(world['demoed']) + len(world['undemoed'])}); lower it or raise generate_data's n_triplets")
    return world


def evaluate(ctx, model, tokenizer, world) -> tuple:
    """(the report less the model, predictions): of the reference files if given, else of prompts from the world."""
    if world is None:
        return evaluate_reference_files(model, tokenizer, ctx.config["reference_files"], ctx.config, ctx.log)
    settings = [(style, n) for style in ctx.config["styles"] for n in ctx.config["distractor_counts"]]
    results, predictions = evaluate_settings(model, tokenizer, world, settings, ctx.config, ctx.log)
    return {"data_seeds": ctx.config["data_seeds"], "candidates": len(world["cities"]), "settings": results}, predictions


def run(ctx) -> dict:
    world = None if ctx.config["reference_files"] else read_world(ctx)
    model_path = trained_or_given(ctx.input("finetune_base"), ctx.model.path)
    model, tokenizer = load_model(model_path)
    report, predictions = evaluate(ctx, model, tokenizer, world)
    report = {"model": str(model_path), **report}
    if is_main_process():
        write_in_context_outputs(report, predictions, ctx.run_dir, ctx.run.label)
    return in_context_headline(report)


def requirements(config: dict) -> tuple:
    """The world is generated only when no reference files are given."""
    return ("finetune_base",) + (() if config["reference_files"] else ("generate_data_spouses",))


SUBJOBS = [
    SubJob("in_context", name, help, run, InContextConfig, {"styles": styles, "distractor_counts": counts},
           requires=requirements, uses_model=True, check=partial(check_config, counts=counts),
           project_data=tables.SHIPPED_DATA,
           external_files=lambda config, workspace: {Path(p): read_reference_in_context for p in config["reference_files"]})
    for name, (help, styles, counts) in SETTINGS.items()
]

JOB = Job("in_context", "two-hop questions over facts given in the prompt (Exp. 3)", tuple(SUBJOBS))
