"""Experiment configs in the reference format, plus our training hyper-parameters.

A config names the data (`train_datasets`, `eval_datasets`), the generation `evaluations` and
optionally `layer_range` and auxiliary-loss keys; everything else has a default. Unknown keys are
errors naming the valid ones. `dataset_file` paths are absolute or relative to the data folder of
the sub-job's data prerequisite (or to the YAML file that names them).
"""
from pathlib import Path

import yaml

from runner.errors import UserError

TRAINING_DEFAULTS = {
    "lr": 1e-5,
    "lr_scheduler": "linear",  # linear | constant (both with warm-up)
    "epochs": 1,
    "max_steps": 0,  # > 0 stops after this many optimizer steps
    "batch_size": 64,
    "gradient_accumulation_steps": 1,
    "warmup_ratio": 0.03,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "max_length": 512,
    "packing": False,
    "bf16": "auto",  # auto: on CUDA devices with bf16 support
    "eval_every_steps": 0,  # 0: at the start and at the end of each epoch only
    "train_fraction": 1.0,  # share of each training file used (seeded); an entry's own `subsample`
                            # (a row count) or `train_fraction` wins
    "eval_subsample": 256,  # rows per eval set for the loss/accuracy evals during training
    "save_every_steps": 200,
    "log_every_steps": 10,
    "layer_range": "",  # "s-e": train decoder layers s..e-1 only (end-exclusive); "" trains all
    "aux_loss_type": "",  # "" | logit | cosine (activation supervision, Exp. 2b)
    "aux_loss_coef": 0.0,
    "aux_loss_target_layer": -1,  # decoder layer whose output is supervised; -1: the middle one
    "wandb": False,  # log to Weights & Biases when installed and enabled
}
REFERENCE_KEYS = {"model_name_or_path": None, "train_datasets": [], "eval_datasets": [], "evaluations": []}
VALID_KEYS = {**REFERENCE_KEYS, **TRAINING_DEFAULTS}


def check_keys(config: dict, where: str) -> None:
    unknown = sorted(set(config) - set(VALID_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(sorted(VALID_KEYS))}")


def load_experiment_yaml(path) -> dict:
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise UserError(f"experiment config {path} does not exist") from None
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a mapping of config keys")
    check_keys(config, str(path))
    for key in ("train_datasets", "eval_datasets"):
        for entry in config.get(key, []):
            if not isinstance(entry, dict) or "name" not in entry or "dataset_file" not in entry:
                raise UserError(f"{path}: each entry of {key} needs 'name' and 'dataset_file'")
            file = Path(entry["dataset_file"])
            if not file.is_absolute():
                entry["dataset_file"] = str((path.parent / file).resolve())
    return config


def parse_layer_range(value: str, num_layers: int):
    """'s-e' -> range(s, e) of decoder layers (end-exclusive); '' -> None (train everything)."""
    if not value:
        return None
    try:
        start, end = (int(x) for x in value.split("-"))
    except ValueError:
        raise UserError(f"layer_range {value!r}: expected 'start-end', e.g. '0-16' (end-exclusive)") from None
    if not 0 <= start < end <= num_layers:
        raise UserError(f"layer_range {value!r}: need 0 <= start < end <= {num_layers} (the model's layer count)")
    return range(start, end)


def resolve_files(entries, data_dir: Path) -> list:
    resolved = []
    for entry in entries:
        file = Path(entry["dataset_file"])
        file = file if file.is_absolute() else data_dir / file
        if not file.is_file():
            raise UserError(f"dataset {entry['name']!r}: file {file} does not exist")
        resolved.append({**entry, "dataset_file": str(file)})
    return resolved
