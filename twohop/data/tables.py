"""Loading and validating the data the project ships in the top-level `datasets/` folder.

Every problem is a UserError naming the file, row and column, so a researcher editing a table
learns exactly what to fix.
"""
import csv
from functools import lru_cache
from pathlib import Path

import yaml

from runner.errors import UserError

DATA = Path(__file__).resolve().parents[2] / "datasets"
ENTITIES = DATA / "entities"
REAL_FACTS = DATA / "real_facts"


def read_yaml(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError(f"missing data file {path}") from None
    except yaml.YAMLError as error:
        raise UserError(f"{path}: not valid YAML ({error})") from None


def read_lines(path: Path) -> list:
    try:
        lines = [l.strip() for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    except FileNotFoundError:
        raise UserError(f"missing data file {path}") from None
    duplicates = sorted({l for l in lines if lines.count(l) > 1})
    if duplicates:
        raise UserError(f"{path}: duplicate entries {duplicates}")
    return lines


def read_table(path: Path, columns=None) -> list:
    """A CSV as a list of dicts of non-empty strings; the first column's values must be unique."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            rows = list(reader)
    except FileNotFoundError:
        raise UserError(f"missing data file {path}") from None
    if columns is not None and header != list(columns):
        raise UserError(f"{path}: columns are {header}, expected {list(columns)}")
    seen = set()
    for number, row in enumerate(rows, 2):  # line 1 is the header
        if None in row or len(row) != len(header):
            raise UserError(f"{path}:{number}: expected {len(header)} columns ({', '.join(header)})")
        for column, value in row.items():
            if value is None or not value.strip():
                raise UserError(f"{path}:{number}: empty value in column {column!r}")
            if value != value.strip():
                raise UserError(f"{path}:{number}: column {column!r} has leading/trailing spaces")
        key = row[header[0]]
        if key in seen:
            raise UserError(f"{path}:{number}: duplicate {header[0]} {key!r}")
        seen.add(key)
    return rows


@lru_cache(maxsize=None)
def entity_schema() -> dict:
    return read_yaml(ENTITIES / "schema.yaml")


def entity_types() -> list:
    return list(entity_schema())


ENTITY_TYPES = tuple(entity_types())  # the semi-synthetic study's types, in schema order


def entity_table(entity_type: str) -> tuple:
    """(schema entry, rows) for one entity type, validated against the schema."""
    schema = entity_schema()
    if entity_type not in schema:
        raise UserError(f"unknown entity type {entity_type!r}; known types: {', '.join(schema)} "
                        f"(add it to {ENTITIES / 'schema.yaml'})")
    spec = schema[entity_type]
    for key in ("noun", "attributes"):
        if key not in spec:
            raise UserError(f"{ENTITIES / 'schema.yaml'}: type {entity_type!r} lacks {key!r}")
    rows = read_table(ENTITIES / f"{entity_type}.csv", ["name", *spec["attributes"]])
    return spec, rows


def templates(name: str) -> dict:
    return read_yaml(DATA / "templates" / f"{name}.yaml")


def names() -> tuple:
    return read_lines(DATA / "names" / "first_names.txt"), read_lines(DATA / "names" / "last_name_parts.txt")


def cities() -> list:
    return read_lines(DATA / "cities.txt")


def aliases() -> dict:
    return read_yaml(REAL_FACTS / "aliases.yaml") or {}
