"""What a fine-tune reads: its training rows and its eval sets, from config entries."""
import random
from pathlib import Path

from runner.errors import UserError
from twohop.data.records import read_records
from twohop.training.config import check_fraction
from twohop.training.experiment import resolve_files
from twohop.training.recipes import subsample


def training_rows(entries, data_dir: Path, default_fraction: float, seed: int) -> list:
    """Each file's seeded share: its `subsample` rows, else `train_fraction` of them (the entry's or the default)."""
    rng = random.Random(seed)
    rows = []
    for entry in resolve_files(entries, data_dir):
        records = read_records(entry["dataset_file"])
        fraction = default_fraction if entry["train_fraction"] is None else entry["train_fraction"]
        check_fraction(fraction, f"train dataset {entry['name']!r}: ")
        rows.extend(subsample(records, entry["subsample"] or round(len(records) * fraction), rng))
    return rows


def eval_sets(entries, data_dir: Path, default_rows: int) -> tuple:
    """({name: first rows}, {shuffled set: its true set}) for the evaluations during training."""
    sets, gaps = {}, {}
    for entry in resolve_files(entries, data_dir):
        rows = read_records(entry["dataset_file"])
        sets[entry["name"]] = rows[:min(entry["subsample"] or default_rows, len(rows))]
        if entry["shuffled_of"]:
            gaps[entry["name"]] = entry["shuffled_of"]
    unknown = {true for true in gaps.values() if true not in sets}
    if unknown:
        raise UserError(f"eval_datasets: shuffled_of names {sorted(unknown)}, which are not eval sets")
    return sets, gaps


def load(config: dict, data_dir: Path, seed: int, run_name: str) -> tuple:
    """(training rows, eval sets, loss-gap pairs) of a `FinetuneConfig`."""
    if not config["train_datasets"]:
        raise UserError(f"{run_name}: no train_datasets; give them in the config or an experiment_config YAML")
    rows = training_rows(config["train_datasets"], data_dir, config["train_fraction"], seed)
    return (rows, *eval_sets(config["eval_datasets"], data_dir, config["eval_subsample"]))


def external_files(config: dict) -> list:
    """Files outside the workspace this config reads: the experiment YAML and every absolute path in it."""
    files = [config["experiment_config"]] if config["experiment_config"] else []
    for key, fields in (("train_datasets", ("dataset_file",)), ("eval_datasets", ("dataset_file",)),
                        ("evaluations", ("dataset_file", "few_shots_path"))):
        files += [entry[f] for entry in config[key] for f in fields if entry[f] and Path(entry[f]).is_absolute()]
    return [Path(f) for f in files]
