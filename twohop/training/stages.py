"""A chain of training stages, each from the previous stage's saved model, evaluated after each.

`<run>/stage_<k>_<name>/` holds the stage's training run (model/, metrics.jsonl, checkpoints while
it trains) and `eval/` (the evaluator's results.json, predictions, summary). `stage.json` is written
last, so a resumed chain skips the finished stages and continues at the first unfinished one (whose
trainer resumes from its own checkpoint). With `peft`, each stage saves an adapter over the previous
stage's model folder (`models.adapters`), on the stage's layers only.
"""
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from runner.config import option
from runner.errors import UserError
from runner.files import atomic_write_json
from twohop.data.records import read_records
from twohop.evaluation.evaluate import EvaluationConfig, evaluate_dataset
from twohop.reports.evaluation import write_reports
from twohop.training.config import AdapterTrainingConfig
from twohop.training.datasets import whole_blocks
from twohop.training.recipes import subsample

ATOMIC_B, ATOMIC_A = ["train/b_demoed", "train/b_undemoed"], ["train/a_demoed", "train/a_undemoed"]
TWO_HOP = ["train/2hop_cot", "train/2hop_nocot"]
STAGES = [
    {"name": "b_facts", "train": ATOMIC_B, "layers": "upper", "lr_scale": 1.0},
    {"name": "a_facts", "train": ATOMIC_A, "layers": "lower", "lr_scale": 1.0},
    {"name": "two_hop", "train": TWO_HOP, "layers": "all", "lr_scale": 1.0},
    {"name": "b_facts_again", "train": ATOMIC_B, "layers": "upper", "lr_scale": 0.1},
    {"name": "a_facts_again", "train": ATOMIC_A, "layers": "lower", "lr_scale": 0.1},
    {"name": "two_hop_again", "train": TWO_HOP, "layers": "all", "lr_scale": 0.1},
]
# The same chain with replay: a stage that stores facts in one half also trains the facts an earlier stage of
# its round stored, so retraining the other half cannot erase them. Without it a small model forgets each
# stage's facts in the next (4 layers: B 99.5% -> 0% while A trains in the lower half, README), and the
# chain measures forgetting instead of storage order.
REPLAY = {"a_facts": ("b", ATOMIC_B), "two_hop": ("ab", ATOMIC_A + ATOMIC_B)}


def with_replay(stage: dict) -> dict:
    """`stage` with its round's earlier facts added to its training files (a_facts -> a_facts_b_replay)."""
    base = stage["name"].removesuffix("_again")
    if base not in REPLAY:
        return stage
    tag, files = REPLAY[base]
    return {**stage, "name": f"{base}_{tag}_replay{stage['name'][len(base):]}", "train": stage["train"] + files}


REPLAY_STAGES = [with_replay(stage) for stage in STAGES]
# After each stage: the held-out atomic tests and the two-hop tests, a small memorisation check, and
# candidate-set scoring over the cities only (scoring every spouse per hop-A question would triple
# the time; hop A is graded on generations), so six evaluations cost about one evaluate_twohop run.
STAGE_EVALUATION = {"skip_kinds": ["in_context", "couples"], "skip_tests": ["test/a_demoed", "test/b_demoed"],
                    "memorisation_rows": 50, "candidate_sets": ["cities"], "bootstrap": 500}
# Eval sets tracked while each stage trains, and the loss gap between the shuffled and true answers.
TRACKED = ("test/2hop_nocot", "test/2hop_nocot_shuffled", "test/a_undemoed", "test/b_undemoed")
LOSS_GAPS = {"2hop_nocot_shuffled": "2hop_nocot"}


@dataclass
class Stage:
    name: str = option("", "the stage's folder name (stage_<k>_<name>)")
    train: list[str] = option([], "training files of the data folder, e.g. [train/b_demoed]")
    layers: str = option("all", "trainable decoder layers: lower, upper, all, or an end-exclusive range 's-e'")
    lr_scale: float = option(1.0, "the stage's learning rate as a multiple of lr", minimum=0.0)


@dataclass
class LayerOrderingConfig(AdapterTrainingConfig):
    train_fraction: float = option(1.0, "share of each stage's training files used, seeded", minimum=0.0,
                                   maximum=1.0)
    eval_subsample: int = option(256, "rows per tracked eval set during training", minimum=1)
    stages: list[Stage] = option(STAGES, "the stages, in order; each trains from the previous stage's model")
    split_layer: int = option(-1, "first layer of the upper half (-1: half the layers)", minimum=-1)
    delete_finished_weights: bool = option(False, "drop a stage's weights once the next has saved its own")
    evaluation: EvaluationConfig = option(EvaluationConfig(**STAGE_EVALUATION), "the evaluation after each stage")


def check_stages(stages) -> None:
    if not stages:
        raise UserError("stages: expected a non-empty list of {name, train, layers, lr_scale}")
    for index, stage in enumerate(stages):
        where = f"stages[{index}]"
        if not stage["name"] or not stage["train"]:
            raise UserError(f"{where}: needs a name and training files, e.g. {{name: b, train: [train/b_demoed]}}")
        if stage["layers"] not in ("lower", "upper", "all") and "-" not in stage["layers"]:
            raise UserError(f"{where}.layers {stage['layers']!r}: expected lower, upper, all or a range 'start-end'")
        if stage["lr_scale"] <= 0:
            raise UserError(f"{where}.lr_scale {stage['lr_scale']!r}: expected a number > 0")


def check_config(config: dict, model=None) -> None:
    from twohop.training.config import check_adapter, check_fraction, check_training
    check_training(config)
    if config["peft"] == "qlora":  # stage 2 on: the base is the previous stage's adapter
        raise UserError("peft=qlora: each stage trains over the previous stage's adapter, which does not merge "
                        "exactly into 4-bit weights; use peft=lora")
    check_adapter(config, model)
    check_fraction(config["train_fraction"])
    if config["peft"] and config["delete_finished_weights"]:
        raise UserError("delete_finished_weights: with peft each stage's adapter builds on the previous stage's "
                        "folder, which must stay; drop one of the two")
    if config["aux_loss_type"]:  # the atomic stages' rows have no question prefix to supervise
        raise UserError("aux_loss_type: the layer-ordering stages train without the auxiliary loss; use finetune_aux_*")
    check_stages(config["stages"])
    if config["evaluation"]["also_before"]:
        raise UserError("evaluation.also_before: each stage is evaluated once; compare stages in stages.json instead")
    if config["split_layer"] == 0:
        raise UserError("split_layer 0: expected -1 (half the layers) or a layer index >= 1")


def layer_range(layers: str, num_layers: int, split: int) -> str:
    """A stage's `layers` as the trainer's end-exclusive 's-e' range ('' trains every parameter)."""
    split = num_layers // 2 if split < 0 else split
    if not 0 < split < num_layers:
        raise UserError(f"split_layer {split}: must be between 1 and {num_layers - 1} for a {num_layers}-layer model")
    return {"lower": f"0-{split}", "upper": f"{split}-{num_layers}", "all": ""}.get(layers, layers)


def stage_rows(data_dir: Path, files, fraction: float, rng: random.Random) -> list:
    """The stage's training rows: the same seeded share of each file as finetune takes."""
    rows = []
    for name in files:
        records = read_records(data_dir / f"{name}.jsonl")
        rows += subsample(records, round(len(records) * fraction), rng)
    return rows


def stage_dirs(run_dir: Path, stages) -> list:
    return [run_dir / f"stage_{k}_{stage['name']}" for k, stage in enumerate(stages, start=1)]


def train_stage(k: int, stage: dict, previous: Path, ctx: dict) -> dict:
    """Train one stage from the `previous` model and evaluate it; its record (written last, as stage.json)."""
    from twohop.training.trainer import train
    config, stage_dir = ctx["config"], ctx["dirs"][k - 1]
    layers = layer_range(stage["layers"], ctx["num_layers"], config["split_layer"]) if ctx["selective"] else ""
    rows = stage_rows(ctx["data_dir"], stage["train"], config["train_fraction"], random.Random(f"{ctx['seed']}:{k}"))
    lr = config["lr"] * stage["lr_scale"]
    ctx["log"].info("stage %d/%d (%s): %d rows, layers %s, lr %.3g", k, len(config["stages"]), stage["name"],
                    len(rows), layers or "all", lr)
    stage_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    trained = train({**config, "lr": lr, "seed": ctx["seed"]}, previous, rows, ctx["eval_sets"], stage_dir, ctx["log"],
                    layers=layers, loss_gaps=LOSS_GAPS)
    trained_s = time.time() - started
    report = evaluate_dataset(stage_dir / "model", ctx["data_dir"], config["evaluation"], ctx["log"], stage_dir / "eval")
    write_reports(report, stage_dir / "eval", f"stage {k}: {stage['name']}", stage_dir / "metrics.jsonl")
    record = {"stage": k, "name": stage["name"], "train": stage["train"], "layer_range": layers or "all", "lr": lr,
              "steps": trained["steps"], "trainable_parameters": trained["trainable_parameters"],
              "train_seconds": round(trained_s, 1), "eval_seconds": round(time.time() - started - trained_s, 1),
              "metrics": report["headline"]}
    atomic_write_json(stage_dir / "stage.json", record)
    return record


def tracked_sets(data_dir: Path, rows: int) -> dict:
    """The eval sets tracked while a stage trains; the shuffled one in whole permutation blocks."""
    sets = {name.split("/")[1]: read_records(data_dir / f"{name}.jsonl")[:rows] for name in TRACKED}
    for shuffled, true in LOSS_GAPS.items():
        sets[shuffled] = whole_blocks(read_records(data_dir / f"test/{shuffled}.jsonl"), sets[true], rows)
    return sets


def run_chain(start_model: Path, data_dir: Path, config: dict, selective: bool, seed: int, run_dir: Path, log) -> list:
    """Train every stage in order (resuming where a killed chain stopped); returns each stage's record."""
    from transformers import AutoConfig
    dirs = stage_dirs(run_dir, config["stages"])
    ctx = {"config": config, "dirs": dirs, "selective": selective, "seed": seed, "data_dir": data_dir, "log": log,
           "num_layers": AutoConfig.from_pretrained(start_model, local_files_only=True).num_hidden_layers,
           "eval_sets": tracked_sets(data_dir, config["eval_subsample"])}
    records, previous = [], start_model
    for k, stage in enumerate(config["stages"], start=1):
        marker = dirs[k - 1] / "stage.json"
        if marker.is_file():
            record = json.loads(marker.read_text())
            log.info("stage %d (%s) finished earlier: skipped", k, stage["name"])
        else:
            record = train_stage(k, stage, previous, ctx)
        if config["delete_finished_weights"] and k > 1:
            drop_weights(dirs[k - 2], log)
        records.append(record)
        previous = dirs[k - 1] / "model"
    return records


def drop_weights(stage_dir: Path, log) -> None:
    """Free a finished stage's weights once the next stage has saved its own (real 8B runs need the disk)."""
    if (stage_dir / "model").is_dir():
        shutil.rmtree(stage_dir / "model")
        log.info("deleted %s (delete_finished_weights)", stage_dir / "model")
