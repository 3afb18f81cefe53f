"""Real two-hop chains e1 -r1-> e2 -r2-> e3 for evaluating existing models.

The shipped set is derived, not hand-listed: hop A comes from an entity table and hop B from a
lookup table in `datasets/real_facts/`, as declared in `relations.yaml`, so every fact is checked
against the project's tables. A Hopping-Too-Late style CSV dropped under `W/datasets/` can be
loaded into the same records.
"""
import ast
import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

from runner.config import option
from runner.errors import UserError
from runner.files import read_text
from twohop.data import tables
from twohop.data.dataset import shortcut_reason, write_dataset
from twohop.evaluation.grading import mentions


@dataclass
class RealFactsConfig:
    hopping_too_late_csv: str = option("", "a Hopping-Too-Late style CSV relative to W/datasets/ (e.g. "
                                           "edenbiran/HoppingTooLate/two_hop.csv); '': the project's chains only")


def csv_path(config: dict, workspace) -> dict:
    """The external CSV a run reads, if any, with its reader."""
    return {workspace.datasets / config["hopping_too_late_csv"]: load_hopping_too_late} \
        if config["hopping_too_late_csv"] else {}
QUESTION_KEYS = ("hop_a", "hop_b", "two_hop", "shortcut_e1", "shortcut_no_e1")
HTL_COLUMNS = ("e1_label", "e2_label", "e3_label", "e2_aliases", "e3_aliases", "r1_template",
               "r2_template", "source_prompt")


def lookup_tables() -> dict:
    found = {name: tables.read_table(tables.REAL_FACTS / f"{name}.csv")
             for name in ("city_countries", "people", "state_capitals")}
    for entity_type in tables.entity_types():
        found[entity_type] = tables.entity_table(entity_type)[1]
    return found


def fact(lookups: dict, marks: dict, how: dict, value: str, where: str) -> tuple:
    """(column `how["column"]` of the row of table `how["table"]` whose `how["key"]` is `value`, why that
    value is ambiguous (tables.ambiguous) or "")."""
    rows = [row for row in lookups[how["table"]] if row[how["key"]] == value]
    if not rows:
        raise UserError(f"{where}: no row with {how['key']} = {value!r} in table {how['table']!r}; "
                        "add it to the lookup table")
    row_key = rows[0][next(iter(rows[0]))]
    why = marks[how["table"]].get(row_key, {}).get(how["column"], "")
    return rows[0][how["column"]], f"{how['table']} {row_key!r} {how['column']}: {why}" if why else ""


def relation_chains(relation: str, spec: dict, lookups: dict, marks: dict, aliases: dict) -> list:
    """The chains of one relation pair: hop A from its table's `e2_column` (through `e2_lookup` if given),
    hop B from `e3`; a chain through an ambiguous value says why in `ambiguous`."""
    where = f"{tables.REAL_FACTS / 'relations.yaml'}: {relation}"
    if spec.get("table") not in lookups:
        raise UserError(f"{where}: unknown table {spec.get('table')!r}")
    for key in QUESTION_KEYS:
        if key not in spec:
            raise UserError(f"{where}: missing {key!r}")
    hops = [{"table": spec["table"], "key": "name", "column": spec["e2_column"]},
            *([spec["e2_lookup"]] if "e2_lookup" in spec else []), spec["e3"]]
    chains = []
    for e1 in [row["name"] for row in lookups[spec["table"]] if row["name"] not in spec.get("exclude", [])]:
        values, doubts = [e1], []
        for how in hops:
            value, why = fact(lookups, marks, how, values[-1], where)
            values.append(value)
            doubts.append(why)
        e2, e3 = values[-2], values[-1]
        chains.append({"id": f"{relation}:{e1}", "relation": relation, "source": "project", "e1": e1, "e2": e2,
                       "e3": e3, "e2_aliases": aliases.get(e2, []), "e3_aliases": aliases.get(e3, []),
                       "questions": {key: spec[key].format(e1=e1, e2=e2) for key in QUESTION_KEYS},
                       "ambiguous": "; ".join(d for d in doubts if d)})
    return chains


def project_chains() -> list:
    lookups = lookup_tables()
    marks = {name: tables.ambiguous(name, rows) for name, rows in lookups.items()}
    aliases = tables.aliases()
    return [chain for relation, spec in tables.read_yaml(tables.REAL_FACTS / "relations.yaml").items()
            for chain in relation_chains(relation, spec, lookups, marks, aliases)]


def _literal_list(value: str, where: str) -> list:
    try:
        parsed = ast.literal_eval(value) if value.strip() else []
    except (ValueError, SyntaxError):
        raise UserError(f"{where}: aliases must be a Python-literal list like ['a', 'b'], got {value[:40]!r}") from None
    if not isinstance(parsed, (list, tuple)) or not all(isinstance(a, str) for a in parsed):
        raise UserError(f"{where}: aliases must be a list of strings")
    return [a for a in parsed if len(a) > 1]


# Relations whose value is a person, asked with "Who" (the rest with "What"), from Hopping Too Late's
# Wikidata relations.
PERSON_RELATIONS = ("spouse", "father", "mother", "composer", "performer", "author", "director", "producer",
                    "screenwriter", "founder", "chief executive officer", "chief operating officer", "head of state")


def _wh(relation: str) -> str:
    return "Who" if any(relation == p or relation.startswith(p + " ") for p in PERSON_RELATIONS) else "What"


def as_question(template: str, entity: str) -> str:
    """A Hopping-Too-Late relation template applied to `entity` as the full question the reference asks,
    or "" when no rule applies. Three rules, a closing " is" dropped first (the first in any case):
    'the <relation> {}' -> '<Wh> is the <relation> <entity>?' ("the capital of {}" -> "What is the
    capital of France?"); '{} has a|an|its <noun> named' -> '<Wh> is the <noun> of <entity>?';
    '{} is|was <verb> by' -> 'Who is|was <entity> <verb> by?'. <Wh> is "Who" for a person relation."""
    template = template.strip().removesuffix(" is")
    if match := re.fullmatch(r"the (.+) \{\}", template, re.IGNORECASE):
        return f"{_wh(match[1])} is the {match[1]} {entity}?"
    if match := re.fullmatch(r"\{\} has (?:a|an|its) (.+) named", template):
        return f"{_wh(match[1])} is the {match[1]} of {entity}?"
    if match := re.fullmatch(r"\{\} (is|was) (\w+) by", template):
        return f"Who {match[1]} {entity} {match[2]} by?"
    return ""


def _question_or_fragment(template: str, entity: str, fragments: list) -> str:
    """The full question, or (no rule applies) the cloze fragment Hopping Too Late asks, noted in `fragments`."""
    question = as_question(template, entity)
    if question:
        return question
    fragments.append(f"no question rule for {template!r}")
    phrase = template.format(entity)
    return f"{phrase} is" if template.rstrip().endswith("{}") else phrase


def hopping_too_late_questions(r1: str, r2: str, e1: str, e2: str, source_prompt: str) -> tuple:
    """(questions, why some are fragments or ""): each hop, the two-hop question (r2 asked of the phrase
    r1 makes of e1) and both shortcuts as full questions (`as_question`), else the fragments."""
    fragments = []
    r1_phrase = r1.strip().removesuffix(" is")
    if re.fullmatch(r"the .+ \{\}", r1_phrase, re.IGNORECASE):  # "the director of {}": a noun phrase r2 can be asked of
        r1_phrase = "the" + r1_phrase[3:]  # lower-case "The": the phrase goes inside the question
        two_hop = _question_or_fragment(r2, r1_phrase.format(e1), fragments)
        # The composed relation with e1 removed: "the director of {}" -> "the director".
        no_e1 = _question_or_fragment(r2, re.sub(r"(?: of)? \{\}$", "", r1_phrase), fragments)
    else:
        fragments.append(f"no question rule for {r1!r} inside the two-hop question")
        two_hop, no_e1 = source_prompt, r2.format(r1.format("")).replace(" of  ", " of ").strip()
    questions = {"hop_a": _question_or_fragment(r1, e1, fragments), "hop_b": _question_or_fragment(r2, e2, fragments),
                 "two_hop": two_hop, "shortcut_e1": _question_or_fragment(r2, e1, fragments), "shortcut_no_e1": no_e1}
    return questions, "; ".join(dict.fromkeys(fragments))


def hopping_too_late_chain(row: dict, number: int, where: str) -> dict:
    """One CSV row as a chain record; its templates must each hold one '{}' for the entity. Questions are
    full questions where a rule applies; a chain with a fragment says why in `fragment`."""
    r1, r2 = row["r1_template"], row["r2_template"]
    for column, template in (("r1_template", r1), ("r2_template", r2)):
        if template.count("{}") != 1 or template.count("{") + template.count("}") != 2:
            raise UserError(f"{where}: {column} {template[:60]!r} must contain one '{{}}' placeholder for the entity")
    questions, fragment = hopping_too_late_questions(r1, r2, row["e1_label"], row["e2_label"], row["source_prompt"])
    return {"id": f"hopping_too_late:{number - 2}", "relation": f"{r1} / {r2}", "source": "hopping_too_late",
            "e1": row["e1_label"], "e2": row["e2_label"], "e3": row["e3_label"],
            "e2_aliases": _literal_list(row["e2_aliases"], where),
            "e3_aliases": _literal_list(row["e3_aliases"], where),
            "questions": questions, "fragment": fragment, "ambiguous": ""}


def load_hopping_too_late(path: Path) -> list:
    """Read a Hopping-Too-Late CSV (its `two_hop.csv` layout) into chain records."""
    if not path.exists():
        raise UserError(f"hopping_too_late_csv: {path} does not exist; put the CSV under the workspace's "
                        "datasets/ folder")
    reader = csv.DictReader(io.StringIO(read_text(path, "Hopping-Too-Late CSV")))
    missing = [c for c in HTL_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise UserError(f"{path}: missing columns {missing}; expected {list(HTL_COLUMNS)}")
    chains = []
    for number, row in enumerate(reader, 2):
        if None in row.values() or None in row:
            columns = reader.fieldnames
            raise UserError(f"{path}:{number}: expected {len(columns)} columns ({', '.join(columns)})")
        chains.append(hopping_too_late_chain(row, number, f"{path}:{number}"))
    if not chains:
        raise UserError(f"{path}: no rows")
    return chains


def flag_shortcuts(chains: list) -> list:
    """Mark chains answerable without the bridge: the bridge inside e1's name ("London Underground" ->
    London), the answer inside e1's or the bridge's name, or the answer inside the two-hop question."""
    for chain in chains:
        question = chain["questions"]["two_hop"]
        in_question = [a for a in (chain["e3"], *chain["e3_aliases"]) if mentions(question, a)]
        chain["shortcut"] = (shortcut_reason(chain["e2"], chain["e2_aliases"], e1=chain["e1"])
                             or shortcut_reason(chain["e3"], chain["e3_aliases"], e1=chain["e1"], e2=chain["e2"])
                             or (f"the answer {in_question[0]!r} is in the question {question!r}" if in_question else ""))
    return chains


# Why a chain is kept out of the frontier headline (and reported beside it): a name gives it away, a
# value is ambiguous, or a Hopping-Too-Late template had no question rule.
SET_ASIDE = ("shortcut", "ambiguous", "fragment")


def set_aside_per_relation(chains: list) -> dict:
    """relation -> {chains, and how many of them each reason in SET_ASIDE sets aside}: the card's count."""
    counts = {}
    for chain in chains:
        count = counts.setdefault(chain["relation"], {"chains": 0, **dict.fromkeys(SET_ASIDE, 0)})
        count["chains"] += 1
        for reason in SET_ASIDE:
            count[reason] += bool(chain.get(reason))
    return dict(sorted(counts.items()))


def generate(ctx) -> dict:
    files = {"chains": flag_shortcuts(project_chains())}
    if ctx.config["hopping_too_late_csv"]:
        files["chains_hopping_too_late"] = flag_shortcuts(
            load_hopping_too_late(ctx.workspace.datasets / ctx.config["hopping_too_late_csv"]))
    per_relation = {name: set_aside_per_relation(chains) for name, chains in files.items()}
    card = {"dataset": "real_facts", "config": ctx.config, "relations": list(per_relation["chains"]),
            "chains_per_relation": {r: c["chains"] for r, c in per_relation["chains"].items()},
            "set_aside_per_relation": per_relation}
    write_dataset(ctx.run_dir / "data", files, card)
    chains = files["chains"]
    return {"chains": len(chains), "relations": len(per_relation["chains"]),
            **{f"{reason}_chains": sum(bool(c[reason]) for c in chains) for reason in ("shortcut", "ambiguous")},
            "hopping_too_late_chains": len(files.get("chains_hopping_too_late", []))}
