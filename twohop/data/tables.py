"""Loading and validating the data the project ships in the top-level `datasets/` folder.

Every problem is a UserError naming the file, row and column, so a researcher editing a table
learns exactly what to fix.
"""
import copy
import csv
import io
from collections import Counter
from functools import lru_cache
from pathlib import Path

from runner import files
from runner.errors import UserError

DATA = Path(__file__).resolve().parents[2] / "datasets"
ENTITIES = DATA / "entities"
REAL_FACTS = DATA / "real_facts"
AMBIGUOUS_LOOKUPS = REAL_FACTS / "ambiguous.yaml"


def read_yaml(path: Path):
    return files.read_yaml(path, "data file")


def read_lines(path: Path) -> list:
    lines = [l.strip() for l in files.read_text(path, "data file").splitlines() if l.strip()]
    duplicates = sorted(line for line, count in Counter(lines).items() if count > 1)
    if duplicates:
        raise UserError(f"{path}: duplicate entries {duplicates}")
    return lines


def read_table(path: Path, columns=None) -> list:
    """A CSV as a list of dicts of non-empty strings; the first column's values must be unique."""
    reader = csv.DictReader(io.StringIO(files.read_text(path, "data file")))
    header = reader.fieldnames or []
    rows = list(reader)
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
    ambiguous(entity_type, rows)
    return spec, rows


def ambiguous(table: str, rows: list) -> dict:
    """{row key: {column: why}}: the values of a table that a reference source would not settle (a disputed
    year, a border peak, a count that changed over time). Entity types mark them in schema.yaml (`ambiguous`),
    the real-facts lookup tables in real_facts/ambiguous.yaml; generators set questions on them aside with
    the reason rather than grade one answer of several right ones."""
    if table in entity_schema():
        where, marks = f"{ENTITIES / 'schema.yaml'}: {table}.ambiguous", entity_schema()[table].get("ambiguous")
    else:
        where, marks = f"{AMBIGUOUS_LOOKUPS}: {table}", (read_yaml(AMBIGUOUS_LOOKUPS) or {}).get(table)
    key = next(iter(rows[0]))
    keys = {row[key] for row in rows}
    for name, columns in (marks or {}).items():
        if name not in keys:
            raise UserError(f"{where}: no row with {key} {name!r}")
        if not isinstance(columns, dict) or not set(columns) <= set(rows[0]) - {key} or \
                not all(isinstance(why, str) and why.strip() for why in columns.values()):
            raise UserError(f"{where}: {name}: expected {{column: reason}} with columns among "
                            f"{', '.join(c for c in rows[0] if c != key)}, got {columns!r}")
    return marks or {}


def templates(name: str) -> dict:
    """A template file's families (a fresh copy: callers may change it)."""
    return copy.deepcopy(parsed_templates(name))


@lru_cache(maxsize=None)
def parsed_templates(name: str) -> dict:
    """A template file's families, parsed once per process and shared: read them, never change them (the drills
    build rows from them for every step)."""
    return read_yaml(DATA / "templates" / f"{name}.yaml")


@lru_cache(maxsize=None)
def shipped_lines(name: str) -> tuple:
    """A word list under datasets/, read once per process: the drills draw fresh people from the name lists
    for every row of every step."""
    return tuple(read_lines(DATA / name))


def names() -> tuple:
    return list(shipped_lines("names/first_names.txt")), list(shipped_lines("names/last_name_parts.txt"))


def base_last_parts() -> list:
    """Last-name parts of the tiny model's base population only (no experiment uses them)."""
    return list(shipped_lines("names/base_last_name_parts.txt"))


def cities() -> list:
    return list(shipped_lines("cities.txt"))


def aliases() -> dict:
    return read_yaml(REAL_FACTS / "aliases.yaml") or {}


def check_shipped_data() -> None:
    """Read everything under datasets/ with the readers the generators use (every table, list and YAML,
    each entity table against the schema), so a broken edit stops the runner before anything runs."""
    readers = {".csv": read_table, ".txt": read_lines, ".yaml": read_yaml}
    for path in sorted(DATA.rglob("*")):
        if path.suffix in readers:
            readers[path.suffix](path)
    for entity_type in entity_types():
        entity_table(entity_type)
    for table in read_yaml(AMBIGUOUS_LOOKUPS) or {}:
        if not (REAL_FACTS / f"{table}.csv").is_file():
            raise UserError(f"{AMBIGUOUS_LOOKUPS}: unknown table {table!r} (not in {REAL_FACTS})")
        ambiguous(table, read_table(REAL_FACTS / f"{table}.csv"))


SHIPPED_DATA = {"datasets": check_shipped_data}  # a sub-job's `project_data` when it reads the shipped tables
