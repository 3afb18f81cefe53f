"""finetune: config-driven fine-tuning, the tiny model's pretraining, every training variant.

Sub-jobs are generated from the library's catalogue (`twohop.training.recipes`): the study variants
(which training files, which extra config), one semi-synthetic sub-job per entity type and one per
IOI family (`ioi_<family>`: trains that family, tracks every family's test). Each
trains from the output of `finetune_base` (the tiny model's pretraining; for a real model that is the
model itself) and saves `model/` (safetensors + tokenizer + config) in its run folder. A reference
experiment YAML (`--set experiment_config=...`) replaces the recipe's keys; its `evaluations:`
block runs after training, into `evaluations.json`.
"""
from dataclasses import dataclass
from functools import partial
from typing import Literal

from accelerate import PartialState

from runner.config import option
from runner.errors import UserError
from runner.files import atomic_write_json
from runner.registry import Job, SubJob
from twohop.data import base_corpus, ioi, tables
from twohop.data.records import read_records
from twohop.evaluation.files import evaluate_block
from twohop.training import datasets, drills, recipes
from twohop.training.config import FinetuneConfig, TrainingConfig, check_finetune, check_training


@dataclass
class BaseConfig(TrainingConfig):
    data_seed: int = option(0, "seed of the base corpus's people and sampling")
    base_people: int = option(300, "fictional people whose facts the base learns (disjoint from every experiment's)",
                              minimum=2)
    base_paraphrases: int = option(10, "question phrasings per fact", minimum=1)
    in_context_rounds: int = option(4, "rounds of facts-in-the-prompt questions", minimum=0)
    in_context_per_round: int = option(150, "people asked about per round and style", minimum=1)
    in_context_people: Literal["base", "fresh"] = option(
        "base", "whom the facts-in-the-prompt rows are about: base (its own people, whose facts it also learns "
        "closed-book, so memory answers them) or fresh (random people drawn per round: only reading the prompt does)")
    copy_rows: int = option(12000, "'repeat these names' rows (copying a name from the prompt)", minimum=0)
    lookup_rows: int = option(0, "rows asking one spouse among six fresh random couples' facts in the study's "
                              "in-context chat prompt (the chat_spouses_born drill as base rows); 0: none", minimum=0)
    drill_phases: list[str] = option(
        [], "skill drills trained before the base corpus, KIND[+KIND...]:STEPS each, 32 rows a step (e.g. random:1000 "
        "forms an induction head, then lines_question_inline_spouses_born:300 teaches finding a spouse among one-fact-a-line "
        "facts; kinds in twohop.data.drills); [] trains none")
    drill_lr: float = option(1e-3, "constant AdamW rate of the drills (an induction head forms at 1e-3, not 3e-3)",
                              minimum=1e-8)
    drill_interleave: str = option("", "a drill kept up while the base corpus trains, KIND[+KIND...]:EVERY: one drill "
                                   "batch (32 rows, full next-token loss) added to every EVERY-th step's loss; '' none")


def base_path(ctx):
    return recipes.trained_or_given(ctx.input("finetune_base"), ctx.model.path)


def run_variant(ctx, data_job: str) -> dict:
    from twohop.training.trainer import train
    rows, eval_sets, gaps = datasets.load(ctx.config, ctx.input(data_job) / "data", ctx.seed, ctx.run.name)
    ctx.log.info("training %s on %d rows from %s", ctx.run.label, len(rows), base_path(ctx))
    metrics = train({**ctx.config, "seed": ctx.seed}, base_path(ctx), rows, eval_sets, ctx.run_dir, ctx.log,
                    layers=ctx.config["layer_range"], loss_gaps=gaps)
    if ctx.config["evaluations"]:  # every rank evaluates its share (the evaluator's own outputs in evaluations/)
        results = evaluate_block(ctx.run_dir / "model", ctx.config["evaluations"], ctx.input(data_job) / "data",
                                 ctx.log, ctx.run_dir / "evaluations")
        if PartialState().is_main_process:
            atomic_write_json(ctx.run_dir / "evaluations.json", results)
        metrics.update({name: r["accuracy"] for name, r in results.items()})
    return metrics


def run_base(ctx) -> dict:
    if not recipes.pretrains(ctx.model):
        atomic_write_json(ctx.run_dir / "base.json", {"model_path": str(ctx.model.path), "trained": False})
        return {"trained": False}
    from twohop.training.trainer import train
    natural = ctx.input("generate_data_natural_facts") / "data"
    rows = base_corpus.corpus(natural / "train" / "natural_facts.jsonl", ctx.config)
    spouses = ctx.input("generate_data_spouses") / "data"
    eval_sets = {"natural_facts": read_records(natural / "test/natural_facts.jsonl")[:256],
                 "in_context_nocot": read_records(spouses / "test/in_context_nocot_seed1.jsonl")[:128]}
    start = ctx.model.path
    if ctx.config["drill_phases"]:
        start = drills.warm_up(start, ctx.config["drill_phases"], drills.DrillSettings(lr=ctx.config["drill_lr"]),
                               ctx.config["data_seed"],
                               ctx.run_dir / "drills", ctx.log)
    extra_loss = None
    if ctx.config["drill_interleave"]:
        from transformers import AutoTokenizer
        extra_loss = drills.interleaved_drill(AutoTokenizer.from_pretrained(start), ctx.config["drill_interleave"],
                                              ctx.config["data_seed"])
    ctx.log.info("pretraining the tiny model on %d rows", len(rows))
    return {"trained": True, "rows": len(rows),
            **train({**ctx.config, "seed": 0}, start, rows, eval_sets, ctx.run_dir, ctx.log, extra_loss=extra_loss)}


def check_base(config: dict, model) -> None:
    check_training(config)
    drills.parse_phases(config["drill_phases"])
    if config["drill_interleave"]:
        drills.parse_phases([config["drill_interleave"]], "drill_interleave", "EVERY")
    shaping = (config["drill_phases"] or config["lookup_rows"] or config["drill_interleave"]
               or config["in_context_people"] != "base")
    if shaping and model is not None and not recipes.pretrains(model):
        raise UserError("drill_phases, drill_interleave, lookup_rows and in_context_people shape the embedded tiny "
                        "model's pretraining; "
                        f"{model.path} is a real model, which finetune_base does not train: drop them")


def finetune(name: str, help: str, data_job: str, defaults) -> SubJob:
    return SubJob("finetune", name, help, partial(run_variant, data_job=data_job), FinetuneConfig, defaults,
                  requires=("finetune_base", data_job), uses_model=True, seeded=True, check=check_finetune,
                  external_files=lambda config, workspace: datasets.external_files(config), trains=True)


SUBJOBS = [
    SubJob("finetune", "base", "the tiny model's pretraining (natural facts, chaining, reading, copying); "
           "a no-op for real models", run_base, BaseConfig, lambda model: recipes.recipe(model, "base"),
           requires=("generate_data_natural_facts", "generate_data_spouses"), uses_model=True,
           check=check_base, project_data=tables.SHIPPED_DATA,
           trains=recipes.pretrains),
] + [
    finetune(v.name, v.help, "generate_data_spouses", partial(recipes.spouses_recipe, v)) for v in recipes.VARIANTS
] + [
    finetune(entity_type, f"semi-synthetic: learn favorite {spec['noun']}s (Exp. 4)", f"generate_data_{entity_type}",
             partial(recipes.semi_synthetic_recipe, list(spec["attributes"])))
    for entity_type, spec in tables.entity_schema().items()
] + [
    finetune(f"ioi_{family}", f"IOI (seed 004), train {family}: {spec['help']}", "generate_data_ioi",
             partial(recipes.ioi_recipe, family, list(ioi.families())))
    for family, spec in ioi.families().items()
]

JOB = Job("finetune", "fine-tune models on the study's data (and pretrain the tiny model)", tuple(SUBJOBS))
