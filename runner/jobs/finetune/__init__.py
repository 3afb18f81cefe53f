"""finetune: config-driven fine-tuning, the tiny model's pretraining, every training variant.

Sub-jobs are generated from data: the study variants below (which training files, which extra
config) and one semi-synthetic sub-job per entity type. Each trains from the output of
`finetune_base` (the tiny model's pretraining; for a real model that is the model itself) and
saves `model/` (safetensors + tokenizer + config) in its run folder.
"""
import random
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from runner.errors import UserError
from runner.files import atomic_write_json
from runner.records import read_records
from runner.registry import Job, SubJob
from runner.jobs.finetune import base
from runner.jobs.finetune.experiment import TRAINING_DEFAULTS, load_experiment_yaml, parse_layer_range, resolve_files
from runner.jobs.generate_data import tables

# Recipes. Reference: the paper's 8B runs. Tiny: what trains the embedded model in minutes on 2 cores.
REFERENCE = {"synthetic": {"lr": 1e-5, "epochs": 1, "batch_size": 64},
             "semi_synthetic": {"lr": 7.5e-7, "epochs": 20, "batch_size": 4},
             "base": {}}
TINY = {"synthetic": {"lr": 3e-3, "epochs": 10, "batch_size": 16, "max_length": 512, "warmup_ratio": 0.02,
                      "train_fraction": 0.35},
        "semi_synthetic": {"lr": 3e-3, "epochs": 30, "batch_size": 8, "max_length": 256,
                           "eval_every_steps": 15},  # 3 steps an epoch: evals every epoch would be most of the time
        "base": {"lr": 3e-3, "epochs": 4, "batch_size": 16, "packing": True, "max_length": 384, "warmup_ratio": 0.02}}
BASE_CORPUS = {"data_seed": 0, "base_people": 300, "base_paraphrases": 10, "in_context_rounds": 4,
               "in_context_per_round": 150, "copy_rows": 12000}

# One document per person: each is that person's only source of both facts, so all of them are kept
# (train_fraction subsamples the many paraphrases of the other files).
WHOLE = {"train/samedoc", "train/samedoc_distractor", "train/samedoc_triplets"}
# 8 epochs, not 10, keeps `--jobs reproduce` well within 15 minutes on 2 cores; measured over 3
# seeds: no-CoT 29% (10 epochs: 21-23%; 5 epochs: 4%).
SAMEDOC_TINY = {"epochs": 8}
ATOMIC = ["train/a_demoed", "train/a_undemoed", "train/b_demoed", "train/b_undemoed"]
TWO_HOP = ["train/2hop_cot", "train/2hop_nocot"]
SPOUSES_EVAL = ["test/2hop_nocot", "test/2hop_nocot_shuffled", "test/2hop_cot", "test/a_undemoed", "test/b_undemoed"]


@dataclass(frozen=True)
class Variant:
    name: str
    help: str
    train_files: list
    extra: dict = field(default_factory=dict)  # config for every model
    tiny: dict = field(default_factory=dict)  # config for the embedded tiny model only


VARIANTS = [
    Variant("spouses", "atomic facts + two-hop CoT and no-CoT of demoed people (Exp. 1, main)", ATOMIC + TWO_HOP),
    Variant("spouses_nocot", "atomic facts + two-hop no-CoT of demoed people", ATOMIC + ["train/2hop_nocot"]),
    Variant("spouses_atomic", "atomic facts only", ATOMIC),
    Variant("samedoc", "both facts in one document + two-hop demos (Exp. 3)", ["train/samedoc"] + TWO_HOP,
            tiny=SAMEDOC_TINY),
    Variant("samedoc_distractors", "same document, a distractor sentence between the facts",
            ["train/samedoc_distractor"] + TWO_HOP, tiny=SAMEDOC_TINY),
    Variant("samedoc_triplets", "same document with 10 distractor triplets", ["train/samedoc_triplets"] + TWO_HOP,
            tiny=SAMEDOC_TINY),
    Variant("aux_logit", "main data + logit-lens supervision of the bridge at a middle layer (Exp. 2b)",
            ATOMIC + TWO_HOP, {"aux_loss_type": "logit", "aux_loss_coef": 1.0, "packing": False}),
    Variant("aux_cosine", "main data + cosine supervision toward the bridge's embedding (Exp. 2b)",
            ATOMIC + TWO_HOP, {"aux_loss_type": "cosine", "aux_loss_coef": 1.0, "packing": False}),
]


def recipe(model, kind: str) -> dict:
    return (TINY if model is not None and model.embedded_preset else REFERENCE)[kind]


def training_defaults(model, kind: str, extra=None, **data) -> dict:
    return {**TRAINING_DEFAULTS, **recipe(model, kind), **(extra or {}),
            "experiment_config": "", **data}


def base_model_path(ctx) -> Path:
    """What finetune_base produced: a trained tiny model, or the real model itself."""
    trained = ctx.input("finetune_base") / "model"
    return trained if trained.is_dir() else ctx.model.path


def subsample(rows: list, keep: int, rng: random.Random) -> list:
    """A seeded sample of `keep` rows (all of them if there are no more)."""
    return rng.sample(rows, keep) if keep < len(rows) else rows


def load_datasets(ctx, data_dir: Path) -> tuple:
    """(train rows, eval sets) from the config's lists or a reference-format experiment YAML."""
    config = ctx.config
    if config["experiment_config"]:
        yaml_path = Path(config["experiment_config"])
        experiment = load_experiment_yaml(yaml_path if yaml_path.is_absolute() else data_dir / yaml_path)
        train_entries, eval_entries = experiment["train_datasets"], experiment.get("eval_datasets", [])
    else:
        train_entries, eval_entries = config["train_datasets"], config["eval_datasets"]
    if not train_entries:
        raise UserError(f"{ctx.run.name}: no train_datasets; give them in the config or an experiment_config YAML")
    rng = random.Random(ctx.seed)
    train_rows = []
    for entry in resolve_files(train_entries, data_dir):
        rows = read_records(entry["dataset_file"])
        fraction = entry.get("train_fraction", config["train_fraction"])
        check_fraction(fraction, f"train dataset {entry['name']!r}: ")
        train_rows.extend(subsample(rows, entry.get("subsample") or round(len(rows) * fraction), rng))
    eval_sets = {}
    for entry in resolve_files(eval_entries, data_dir):
        rows = read_records(entry["dataset_file"])
        keep = min(entry.get("subsample") or config["eval_subsample"], len(rows))
        eval_sets[entry["name"]] = rows[:keep]
    return train_rows, eval_sets


def run_variant(ctx, data_job: str) -> dict:
    from runner.jobs.finetune.trainer import train
    config = {k: v for k, v in ctx.config.items() if k in TRAINING_DEFAULTS}
    train_rows, eval_sets = load_datasets(ctx, ctx.input(data_job) / "data")
    ctx.log.info("training %s on %d rows from %s", ctx.run.label, len(train_rows), base_model_path(ctx))
    return train({**config, "seed": ctx.seed}, base_model_path(ctx), train_rows, eval_sets, ctx.run_dir, ctx.log)


def run_base(ctx) -> dict:
    if not ctx.model.embedded_preset:  # a real model brings its pretraining
        atomic_write_json(ctx.run_dir / "base.json", {"model_path": str(ctx.model.path), "trained": False})
        return {"trained": False}
    from runner.jobs.finetune.trainer import train
    rows = base.corpus(ctx.input("generate_data_natural_facts") / "data" / "train" / "natural_facts.jsonl",
                       ctx.config)
    config = {k: v for k, v in ctx.config.items() if k in TRAINING_DEFAULTS}
    spouses = ctx.input("generate_data_spouses") / "data"
    eval_sets = {"natural_facts": read_records(ctx.input("generate_data_natural_facts") / "data/test/natural_facts.jsonl")[:256],
                 "in_context_nocot": read_records(spouses / "test/in_context_nocot_seed1.jsonl")[:128]}
    ctx.log.info("pretraining the tiny model on %d rows", len(rows))
    return {"trained": True, "rows": len(rows),
            **train({**config, "seed": 0}, ctx.model.path, rows, eval_sets, ctx.run_dir, ctx.log)}


def check_fraction(fraction, where: str = "") -> None:
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise UserError(f"{where}train_fraction {fraction!r}: must be in (0, 1]")


def check_training_config(config: dict) -> None:
    check_fraction(config["train_fraction"])
    for entry in config.get("train_datasets", []):
        if "train_fraction" in entry:
            check_fraction(entry["train_fraction"], f"train dataset {entry.get('name')!r}: ")
    if config["aux_loss_type"] not in ("", "logit", "cosine"):
        raise UserError(f"aux_loss_type {config['aux_loss_type']!r}: expected '', 'logit' or 'cosine'")
    if config["aux_loss_type"] and config["packing"]:
        raise UserError("aux_loss_type needs packing=false (the supervised position is per row)")
    if config["layer_range"]:
        parse_layer_range(config["layer_range"], num_layers=10**6)  # the layer count is checked at load time


def spouses_defaults(variant, model):
    tiny = variant.tiny if model is not None and model.embedded_preset else {}
    return training_defaults(model, "synthetic", {**tiny, **variant.extra},
                             train_datasets=[{"name": f.split("/")[1], "dataset_file": f"{f}.jsonl",
                                              **({"train_fraction": 1.0} if f in WHOLE else {})}
                                             for f in variant.train_files],
                             eval_datasets=[{"name": f.split("/")[1], "dataset_file": f"{f}.jsonl"} for f in SPOUSES_EVAL],
                             evaluations=["acc_a", "acc_b", "acc_2hop_cot", "acc_2hop_nocot"])


SUBJOBS = [
    SubJob("finetune", "base", "the tiny model's pretraining (natural facts, chaining, reading, copying); "
           "a no-op for real models", run_base,
           lambda model: {**training_defaults(model, "base"), **BASE_CORPUS},
           requires=("generate_data_natural_facts", "generate_data_spouses"), uses_model=True,
           check=check_training_config, project_data=("datasets",)),
] + [
    SubJob("finetune", v.name, v.help, partial(run_variant, data_job="generate_data_spouses"),
           partial(spouses_defaults, v), requires=("finetune_base", "generate_data_spouses"),
           uses_model=True, seeded=True, check=check_training_config)
    for v in VARIANTS
] + [
    SubJob("finetune", entity_type, f"semi-synthetic: learn favorite {spec['noun']}s (Exp. 4)",
           partial(run_variant, data_job=f"generate_data_{entity_type}"),
           lambda model: training_defaults(model, "semi_synthetic", experiment_config="finetune_config.yaml",
                                           train_datasets=[], eval_datasets=[], evaluations=[]),
           requires=("finetune_base", f"generate_data_{entity_type}"), uses_model=True, seeded=True,
           check=check_training_config)
    for entity_type, spec in tables.entity_schema().items()
]

JOB = Job("finetune", "fine-tune models on the study's data (and pretrain the tiny model)", tuple(SUBJOBS))
