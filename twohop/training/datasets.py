"""What a fine-tune reads: its training rows and its eval sets, from config entries."""
import random
from functools import partial
from pathlib import Path

from runner.errors import UserError
from twohop.data.records import read_records
from twohop.training.config import check_fraction
from twohop.training.experiment import FILE_KEYS, load_experiment_yaml, resolve_files
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


def whole_blocks(shuffled: list, true: list, limit: int) -> list:
    """The shuffled rows of the true set's questions, in whole permutation blocks (as many as fit in
    `limit` rows, at least one), so every question has as many shuffled answers as every other and the
    answer mix matches the true set's. Rows without a `permutation` field: the first `limit` of them."""
    questions = {row.get("question") for row in true}
    rows = [row for row in shuffled if row.get("question") in questions]
    if not rows or not all("permutation" in row for row in rows):
        return rows[:limit]
    blocks = max(1, limit // max(1, len(true)))
    return [row for row in rows if row["permutation"] < blocks]


def eval_sets(entries, data_dir: Path, default_rows: int) -> tuple:
    """({name: rows}, {shuffled set: its true set}) for the evaluations during training: the first rows of
    each set, and for a shuffled set whole permutation blocks of its true set's questions."""
    sets, gaps, files = {}, {}, {}
    for entry in resolve_files(entries, data_dir):
        rows = read_records(entry["dataset_file"])
        sets[entry["name"]] = rows[:min(entry["subsample"] or default_rows, len(rows))]
        files[entry["name"]] = (rows, entry["subsample"] or default_rows)
        if entry["shuffled_of"]:
            gaps[entry["name"]] = entry["shuffled_of"]
    unknown = {true for true in gaps.values() if true not in sets}
    if unknown:
        raise UserError(f"eval_datasets: shuffled_of names {sorted(unknown)}, which are not eval sets")
    for shuffled, true in gaps.items():  # the gap over the questions no name gives away, as in the evaluation
        sets[true] = [row for row in sets[true] if not row.get("shortcut")]
        sets[shuffled] = whole_blocks(files[shuffled][0], sets[true], files[shuffled][1])
    return sets, gaps


def load(config: dict, data_dir: Path, seed: int, run_name: str) -> tuple:
    """(training rows, eval sets, loss-gap pairs) of a `FinetuneConfig`."""
    if not config["train_datasets"]:
        raise UserError(f"{run_name}: no train_datasets; give them in the config or an experiment_config YAML")
    rows = training_rows(config["train_datasets"], data_dir, config["train_fraction"], seed)
    return (rows, *eval_sets(config["eval_datasets"], data_dir, config["eval_subsample"]))


def external_files(config: dict) -> dict:
    """Files outside the workspace this config reads, each with its reader: the experiment YAML and every
    absolute path in the config (records files, from the YAML or --set)."""
    files = {Path(config["experiment_config"]): partial(load_experiment_yaml, data_root=config["data_root"])} \
        if config["experiment_config"] else {}
    for key, fields in FILE_KEYS.items():
        files.update({Path(entry[f]): read_records for entry in config[key] for f in fields
                      if entry[f] and Path(entry[f]).is_absolute()})
    return files
