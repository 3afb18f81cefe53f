"""Experiment configs in the reference repo's format, read as a layer of `FinetuneConfig` keys.

A YAML names the data (`train_datasets`, `eval_datasets`), the generation `evaluations` run after
training, and any training key (`lr`, `layer_range`, `aux_loss_type`, ...). A file it names is found,
in this order: as is if absolute; under the data root (`--set data_root=...`, by default the nearest
folder at or above the YAML's that holds a `datasets/` folder: the reference's repository root, where
its train.py runs); under the YAML's own folder. A missing file is one error listing where it looked.
The reference's own conventions are translated here, once: `aux_loss: false` turns the auxiliary loss
off, and an eval set named `X_shuffled` is the shuffled baseline of the set `X`. Every other key must be
a config key, or the run is refused naming it.
"""
from pathlib import Path

from runner.errors import UserError
from runner.files import read_yaml

FILE_KEYS = {"train_datasets": ("dataset_file",), "eval_datasets": ("dataset_file",),
             "evaluations": ("dataset_file", "few_shots_path")}


def default_data_root(yaml_path: Path):
    """The nearest folder at or above the YAML's that holds a `datasets/` folder, or None."""
    return next((folder for folder in [yaml_path.parent, *yaml_path.parent.parents]
                 if (folder / "datasets").is_dir()), None)


def find_file(name: str, yaml_path: Path, data_root=None) -> str:
    """An absolute path for a file a YAML names: as is, else under the data root, else under the YAML's folder."""
    path = Path(name).expanduser()
    if path.is_absolute():
        return str(path)
    roots = [Path(data_root)] if data_root else [r for r in [default_data_root(yaml_path)] if r]
    candidates = [root / path for root in roots] + [yaml_path.parent / path]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        hint = "" if roots else " (no folder above it holds datasets/; --set data_root=<folder> names the root)"
        raise UserError(f"{yaml_path}: file {name!r} not found; looked for {', '.join(map(str, candidates))}{hint}")
    return str(found.resolve())


def load_experiment_yaml(path, data_root: str = "") -> dict:
    """The YAML's keys, its files resolved to absolute paths (see the module's order) and the reference's
    conventions translated."""
    path = Path(path)
    config = read_yaml(path, "experiment config") or {}
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a mapping of config keys")
    if config.get("data_root"):  # the YAML's own root, relative to its folder; --set data_root wins
        config["data_root"] = str((path.parent / str(config["data_root"])).resolve())
    data_root = data_root or config.get("data_root", "")
    for key, fields in FILE_KEYS.items():
        entries = config.get(key) or []
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise UserError(f"{path}: {key} must be a list of mappings")
        for entry in entries:
            for field in fields:
                if entry.get(field):
                    entry[field] = find_file(entry[field], path, data_root)
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


def experiment_layer(path, config: dict) -> dict:
    """The config layer an `experiment_config` YAML gives, its files found from the config's `data_root`."""
    return load_experiment_yaml(path, config["data_root"])


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
