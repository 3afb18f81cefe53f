"""The study's fine-tuning settings as data: which files each variant trains on, and the recipes.

Recipes: `REFERENCE` is the paper's 8B runs; `TINY` is what trains the embedded model in minutes on
2 cores. A variant of the fully synthetic study names its training files and any extra config;
the semi-synthetic study has one setting per entity type. Jobs generate their sub-jobs from these.
"""
import copy
import random
from dataclasses import dataclass, field
from pathlib import Path

from twohop.data import tables

REFERENCE = {"synthetic": {"lr": 1e-5, "epochs": 1, "batch_size": 64},
             "semi_synthetic": {"lr": 7.5e-7, "epochs": 20, "batch_size": 4},
             "base": {},
             # Not the paper's: a starting point for GPT-2 small on one IOI family (seed note 004), not measured
             # here (no GPT-2 weights offline).
             "ioi": {"lr": 5e-5, "epochs": 3, "batch_size": 16, "max_length": 128}}
TINY = {"synthetic": {"lr": 3e-3, "epochs": 10, "batch_size": 16, "max_length": 512, "warmup_ratio": 0.02,
                      "train_fraction": 0.35},
        # With natural-fact replay (below), measured on universities from the shipped base: hop B 100% on every
        # attribute after (93/75/79/77% before), first hop 80% on held-out phrasings; without it hop B fell to 0%.
        "semi_synthetic": {"lr": 3e-3, "epochs": 10, "batch_size": 8, "max_length": 256},
        "base": {"lr": 3e-3, "epochs": 4, "batch_size": 16, "packing": True, "max_length": 384, "warmup_ratio": 0.02},
        "ioi": {"lr": 3e-3, "epochs": 3, "batch_size": 16, "max_length": 128}}

# One document per person: each is that person's only source of both facts, so all of them are kept
# (train_fraction subsamples the many paraphrases of the other files).
WHOLE = {"train/samedoc", "train/samedoc_distractor", "train/samedoc_triplets"}
# 8 epochs, not 10, keeps `--jobs reproduce` well within 15 minutes on 2 cores; measured over 3
# seeds: no-CoT 29% (10 epochs: 21-23%; 5 epochs: 4%).
SAMEDOC_TINY = {"epochs": 8}
ATOMIC = ["train/a_demoed", "train/a_undemoed", "train/b_demoed", "train/b_undemoed"]
TWO_HOP = ["train/2hop_cot", "train/2hop_nocot"]
# Eval sets tracked during training: (file, the true set it is the shuffled baseline of).
SPOUSES_EVAL = [("test/2hop_nocot", ""), ("test/2hop_nocot_shuffled", "2hop_nocot"), ("test/2hop_cot", ""),
                ("test/a_undemoed", ""), ("test/b_undemoed", "")]


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


def setting_data() -> dict:
    """{fine-tuning setting: the generate_data sub-job its data comes from}: the variants, then one per entity type."""
    return {**{v.name: "generate_data_spouses" for v in VARIANTS},
            **{t: f"generate_data_{t}" for t in tables.ENTITY_TYPES}}


# `tiny-organism`'s pretraining: the default's base corpus after drills that form an induction head
# (random), then find a spouse among facts one a line and in the study's chat prompt, then answer the
# study's in-context two-hop question (CoT and no-CoT in turn); that last drill is kept up on every second
# base step, with the chat lookup as base rows and facts-in-the-prompt rows about people it never learned.
# Trials 9-11 and 14 of the README's "Facts in the prompt" led to it (12 and 13 cut its time and lost the
# lookup; 14 kept it at 44 minutes).
ORGANISM_BASE = {"drill_phases": ["random:1000", "lines_question_inline_spouses_born:400", "chat_spouses_born:400",
                                  "chat_two_hop_cot+chat_two_hop:1600"],
                 "drill_interleave": "chat_two_hop_cot+chat_two_hop:2", "lookup_rows": 2000,
                 "in_context_people": "fresh"}
PRESET_RECIPES = {"tiny-organism": {"base": ORGANISM_BASE}}


def recipe(model, kind: str) -> dict:
    """`kind` (synthetic, semi_synthetic, base, ioi) for the tiny model (with its preset's own settings,
    if any) or for a real one."""
    if model is None or not model.embedded_preset:
        return dict(REFERENCE[kind])
    return copy.deepcopy({**TINY[kind], **PRESET_RECIPES.get(model.embedded_preset, {}).get(kind, {})})


def entry(file: str, **extra) -> dict:
    return {"name": file.split("/", 1)[1], "dataset_file": f"{file}.jsonl", **extra}


def spouses_recipe(variant: Variant, model) -> dict:
    tiny = variant.tiny if model is not None and model.embedded_preset else {}
    return {**recipe(model, "synthetic"), **tiny, **variant.extra,
            "train_datasets": [entry(f, **({"train_fraction": 1.0} if f in WHOLE else {})) for f in variant.train_files],
            "eval_datasets": [entry(f, shuffled_of=of) for f, of in SPOUSES_EVAL]}


# The tiny model forgets hop B while it learns the first hop unless it keeps seeing its natural facts;
# a real model's pretraining is not replayed (the reference trains the first hop alone).
TINY_REPLAY_ROWS = 300


def semi_synthetic_recipe(attributes, model) -> dict:
    """Train the first hop (the tiny model with natural-fact replay); track the first hop, each natural
    fact and each two-hop test."""
    evals = [entry("test/first_hop")]
    for attribute in attributes:
        evals += [entry(f"test/b_{attribute}"), entry(f"test/{attribute}_nocot"), entry(f"test/{attribute}_cot"),
                  entry(f"test/{attribute}_nocot_shuffled", shuffled_of=f"{attribute}_nocot")]
    train = [entry("train/first_hop")]
    if model is not None and model.embedded_preset:
        train.append(entry("train/natural_facts_replay", subsample=TINY_REPLAY_ROWS))
    return {**recipe(model, "semi_synthetic"), "train_datasets": train, "eval_datasets": evals}


def ioi_recipe(family: str, families, model) -> dict:
    """Train one IOI family; track every family's test (does learning 3-object IOI keep 2-object IOI?)."""
    return {**recipe(model, "ioi"), "train_datasets": [entry(f"train/{family}")],
            "eval_datasets": [entry(f"test/{name}") for name in families]}


def pretrains(model) -> bool:
    """Whether finetune_base trains `model`: the embedded tiny model needs its pretraining, a real model brings its own."""
    return model.embedded_preset is not None


def trained_or_given(base_run_dir: Path, model_path: Path) -> Path:
    """What `finetune_base` produced: a trained tiny model, or (for a real model) the model itself."""
    trained = Path(base_run_dir) / "model"
    return trained if trained.is_dir() else Path(model_path)


def subsample(rows: list, keep: int, rng: random.Random) -> list:
    """A seeded sample of `keep` rows (all of them if there are no more)."""
    return rng.sample(rows, keep) if keep < len(rows) else rows
