"""A chain of training stages, each from the previous stage's saved model, evaluated after each.

`<run>/stage_<k>_<name>/` holds the stage's training run (model/, metrics.jsonl, checkpoints while
it trains) and `eval/` (the evaluator's results.json, predictions, summary). `stage.json` is written
last, so a resumed chain skips the finished stages and continues at the first unfinished one (whose
trainer resumes from its own checkpoint).
"""
import json
import random
import shutil
import time
from pathlib import Path

from runner.errors import UserError
from runner.files import atomic_write_json
from runner.records import read_records
from runner.jobs.evaluate_twohop.evaluate import evaluate_dataset
from runner.jobs.evaluate_twohop.report import write_reports
from runner.jobs.finetune import subsample
from runner.jobs.finetune.experiment import TRAINING_DEFAULTS

STAGE_KEYS = {"name", "train", "layers", "lr_scale"}


def check_stages(stages) -> None:
    if not isinstance(stages, list) or not stages:
        raise UserError("stages: expected a non-empty list of {name, train, layers, lr_scale}")
    for index, stage in enumerate(stages):
        where = f"stages[{index}]"
        if not isinstance(stage, dict) or set(stage) != STAGE_KEYS:
            raise UserError(f"{where}: expected exactly the keys {sorted(STAGE_KEYS)}, got {stage!r}")
        if not stage["train"] or not all(isinstance(f, str) for f in stage["train"]):
            raise UserError(f"{where}.train: expected a list of training files, e.g. ['train/b_demoed']")
        layers = stage["layers"]
        if layers not in ("lower", "upper", "all") and not (isinstance(layers, str) and "-" in layers):
            raise UserError(f"{where}.layers {layers!r}: expected lower, upper, all or a range 'start-end'")
        if not isinstance(stage["lr_scale"], (int, float)) or stage["lr_scale"] <= 0:
            raise UserError(f"{where}.lr_scale {stage['lr_scale']!r}: expected a number > 0")


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


def run_chain(start_model: Path, data_dir: Path, config: dict, selective: bool, seed: int, run_dir: Path, log) -> list:
    """Train every stage in order (resuming where a killed chain stopped); returns each stage's record."""
    from runner.jobs.finetune.trainer import train
    from transformers import AutoConfig
    num_layers = AutoConfig.from_pretrained(start_model, local_files_only=True).num_hidden_layers
    training = {k: v for k, v in config.items() if k in TRAINING_DEFAULTS}
    eval_sets = {name: read_records(data_dir / f"{name}.jsonl")[:config["eval_subsample"]]
                 for name in ("test/2hop_nocot", "test/2hop_nocot_shuffled", "test/a_undemoed", "test/b_undemoed")}
    records, previous = [], start_model
    for k, (stage, stage_dir) in enumerate(zip(config["stages"], stage_dirs(run_dir, config["stages"])), start=1):
        marker = stage_dir / "stage.json"
        if marker.is_file():
            record = json.loads(marker.read_text())
            log.info("stage %d (%s) finished earlier: skipped", k, stage["name"])
        else:
            layers = layer_range(stage["layers"], num_layers, config["split_layer"]) if selective else ""
            rows = stage_rows(data_dir, stage["train"], config["train_fraction"], random.Random(f"{seed}:{k}"))
            log.info("stage %d/%d (%s): %d rows, layers %s, lr %.3g", k, len(config["stages"]), stage["name"],
                     len(rows), layers or "all", config["lr"] * stage["lr_scale"])
            stage_dir.mkdir(parents=True, exist_ok=True)
            started = time.time()
            trained = train({**training, "lr": config["lr"] * stage["lr_scale"], "layer_range": layers, "seed": seed},
                            previous, rows, {n.split("/")[1]: r for n, r in eval_sets.items()}, stage_dir, log)
            trained_s = time.time() - started
            report = evaluate_dataset(stage_dir / "model", data_dir, config["evaluation"], log, stage_dir / "eval")
            write_reports(report, stage_dir / "eval", f"stage {k}: {stage['name']}", stage_dir / "metrics.jsonl")
            record = {"stage": k, "name": stage["name"], "train": stage["train"], "layer_range": layers or "all",
                      "lr": config["lr"] * stage["lr_scale"], "steps": trained["steps"],
                      "trainable_parameters": trained["trainable_parameters"], "train_seconds": round(trained_s, 1),
                      "eval_seconds": round(time.time() - started - trained_s, 1), "metrics": report["headline"]}
            atomic_write_json(marker, record)
        if config["delete_finished_weights"] and k > 1:
            drop_weights(stage_dirs(run_dir, config["stages"])[k - 2], log)
        records.append(record)
        previous = stage_dir / "model"
    return records


def drop_weights(stage_dir: Path, log) -> None:
    """Free a finished stage's weights once the next stage has saved its own (real 8B runs need the disk)."""
    if (stage_dir / "model").is_dir():
        shutil.rmtree(stage_dir / "model")
        log.info("deleted %s (delete_finished_weights)", stage_dir / "model")
