"""Experiment configs in the reference repo's format, read as a layer of `FinetuneConfig` keys.

A YAML names the data (`train_datasets`, `eval_datasets`), the generation `evaluations` run after
training, and any training key (`lr`, `layer_range`, `aux_loss_type`, ...). Its files are found
relative to the YAML's folder or, as the reference writes them, to a folder above it (the repository
root). The reference's own conventions are translated here, once: `aux_loss: false` turns the
auxiliary loss off, and an eval set named `X_shuffled` is the shuffled baseline of the set `X`.
Every other key must be a config key, or the run is refused naming it.
"""
from pathlib import Path

from runner.errors import UserError
from runner.files import read_yaml

FILE_KEYS = {"train_datasets": ("dataset_file",), "eval_datasets": ("dataset_file",),
             "evaluations": ("dataset_file", "few_shots_path")}


def find_file(name: str, yaml_path: Path) -> str:
    """An absolute path for a file a YAML names: as is, or under the YAML's folder or a folder above it."""
    path = Path(name).expanduser()
    if path.is_absolute():
        return str(path)
    for folder in [yaml_path.parent, *yaml_path.parent.parents]:
        if (folder / path).is_file():
            return str((folder / path).resolve())
    raise UserError(f"{yaml_path}: file {name!r} not found under {yaml_path.parent} or any folder above it")


def load_experiment_yaml(path) -> dict:
    """The YAML's keys, its files resolved to absolute paths and the reference's conventions translated."""
    path = Path(path)
    config = read_yaml(path, "experiment config") or {}
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a mapping of config keys")
    for key, fields in FILE_KEYS.items():
        entries = config.get(key) or []
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise UserError(f"{path}: {key} must be a list of mappings")
        for entry in entries:
            for field in fields:
                if entry.get(field):
                    entry[field] = find_file(entry[field], path)
    names = {str(entry.get("name")) for entry in config.get("eval_datasets") or []}
    for entry in config.get("eval_datasets") or []:
        name = str(entry.get("name", ""))
        if name.endswith("_shuffled") and name.removesuffix("_shuffled") in names and "shuffled_of" not in entry:
            entry["shuffled_of"] = name.removesuffix("_shuffled")
    switch = config.pop("aux_loss", None)
    if switch is False:
        config.update(aux_loss_type="", aux_loss_coef=0.0)
    elif switch is True and not config.get("aux_loss_type"):
        raise UserError(f"{path}: aux_loss: true needs aux_loss_type (logit or cosine) and aux_loss_coef")
    elif switch not in (None, True):
        raise UserError(f"{path}: aux_loss: expected true or false, got {switch!r}")
    if config.get("model_name_or_path") is None:
        config.pop("model_name_or_path", None)
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
