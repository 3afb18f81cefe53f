"""Building blocks shared by the dataset generators: names, permutations, atomic dataset writes."""
import itertools
import json
import random
from pathlib import Path

from runner.errors import UserError
from runner.files import atomic_directory, to_json
from twohop.data import tables
from twohop.data.records import read_records
from twohop.evaluation.grading import mentions, split_aliases


def fictional_people(rng: random.Random, count: int, first_names, last_parts, forbidden=()) -> list:
    """`count` distinct "First Last-Last" names; compound last names keep them off real people."""
    forbidden = set(forbidden)
    pool = [f"{first} {a}-{b}" for first, a, b in itertools.product(first_names, last_parts, last_parts) if a != b]
    pool = [name for name in pool if name not in forbidden]
    if count > len(pool):
        raise UserError(f"asked for {count} fictional people but the name lists allow only {len(pool)}")
    return rng.sample(pool, count)


def random_name(rng: random.Random, first_names, last_parts) -> str:
    """A random person: a first name and a double-barrelled last name ("Ulla Ravenscroft-Szymanski")."""
    first, (a, b) = rng.choice(first_names), rng.sample(last_parts, 2)
    return f"{first} {a}-{b}"


def couples(rng: random.Random, names: list) -> list:
    """(e1, e2, e3) triplets: consecutive names married, the second born in a random city."""
    cities = tables.cities()
    return [{"e1": names[2 * i], "e2": names[2 * i + 1], "e3": rng.choice(cities)} for i in range(len(names) // 2)]


def fresh_people(rng: random.Random, count: int, forbidden: set = frozenset()) -> list:
    """`count` (e1, e2, e3) triplets of distinct random people from every name list, none of whom is in
    `forbidden` (e.g. the base's own people, whose facts it also learns closed-book): in-context rows about
    them can only be answered by reading the prompt."""
    first_names, last_parts = tables.names()
    last_parts = sorted({*last_parts, *tables.base_last_parts()})
    names = []
    while len(names) < 2 * count:
        name = random_name(rng, first_names, last_parts)
        if name not in forbidden and name not in names:
            names.append(name)
    return couples(rng, names)


def derangement(rng: random.Random, n: int) -> list:
    """A random permutation with no fixed point (Sattolo's algorithm: one cycle through all)."""
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        order[i], order[j] = order[j], order[i]
    return order


def shuffled_answers(rows, rng: random.Random, n_permutations: int, answer_key: str = "answer",
                     joint_keys=("answer_intermediate",)) -> list:
    """The chance baseline: copies of `rows` whose answers (and bridges, jointly) are permuted.

    Each permutation starts from a derangement and then swaps rows so that every row whose true
    answer is not shared by all rows gets a different answer.
    """
    out = []
    for permutation in range(n_permutations):
        order = derangement(rng, len(rows))
        for i in range(len(rows)):
            if rows[order[i]][answer_key] != rows[i][answer_key]:
                continue
            for j in range(len(rows)):
                if (rows[order[j]][answer_key] != rows[i][answer_key]
                        and rows[order[i]][answer_key] != rows[j][answer_key]):
                    order[i], order[j] = order[j], order[i]
                    break
        for i, row in enumerate(rows):
            source = rows[order[i]]
            new = json.loads(json.dumps(row))
            new[answer_key] = source[answer_key]
            for key in joint_keys:
                new[key] = source[key]
            new["messages"][-1]["content"] = source["messages"][-1]["content"]
            new["permutation"] = permutation
            new["true_answer"] = row[answer_key]
            out.append(new)
    return out


def require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise UserError(f"config {key}: {message}")


def shortcut_reason(answer: str, aliases=(), **names) -> str:
    """Why an item can be answered without composing: its answer (or an alias) is a word of a name the
    question or the first hop gives away (`names`: label -> name, e.g. e2="University of Texas at
    Austin"); "" when there is none."""
    for label, name in names.items():
        found = [a for a in (answer, *aliases) if name and a and mentions(name, a)]
        if found:
            return f"the answer {found[0]!r} is in {label}'s name {name!r}"
    return ""


def with_shortcut_flags(rows: list) -> list:
    """Rows as graded: our generators flag shortcuts when they write a row; a row brought without the
    field (a reference file, one's own JSONL) is flagged here by the same rule, from its answer and
    aliases against its bridge (`answer_intermediate`) and, where given, `e1`."""
    flagged = []
    for row in rows:
        if "shortcut" not in row:
            answer, aliases = split_aliases(row.get("answer"))
            bridge, _ = split_aliases(row.get("answer_intermediate"))
            row = {**row, "shortcut": shortcut_reason(answer, (*aliases, *row.get("aliases", ())),
                                                      e1=row.get("e1", ""), e2=bridge)}
        flagged.append(row)
    return flagged


# What a card says of each test file, so readers never parse file names.
TEST_KINDS = ("hop_a", "hop_b", "two_hop", "couples", "in_context", "ioi")
TEST_FIELDS = {"kind": "what is asked: " + ", ".join(TEST_KINDS), "style": "nocot or cot",
               "candidate_set": "the card's candidate set its answers come from"}
OPTIONAL_FIELDS = {"attribute": "", "shuffled_of": "", "metric": ""}


def test_spec(kind: str, style: str, candidate_set: str, attribute: str = "", shuffled_of: str = "",
              metric: str = "") -> dict:
    """A card entry: `attribute` groups a semi-synthetic test; `shuffled_of` names the true test this
    one is the chance baseline of; `metric` is its headline name (e.g. acc_a), "" for none."""
    return {"kind": kind, "style": style, "candidate_set": candidate_set, "attribute": attribute,
            "shuffled_of": shuffled_of, "metric": metric}


def check_card(card: dict, files: dict) -> None:
    """Every test file is declared, with valid metadata; refused at generation time otherwise."""
    where = f"dataset {card.get('dataset')!r}"
    undeclared = sorted(n for n in files if n.startswith("test/") and n not in card.get("tests", {}))
    if undeclared:
        raise UserError(f"{where}: test file(s) {undeclared} have no entry in card['tests']; declare "
                        f"{', '.join(f'{k} ({v})' for k, v in TEST_FIELDS.items())}")
    for name, spec in card.get("tests", {}).items():
        missing = [k for k in TEST_FIELDS if k not in spec]
        unknown = set(spec) - set(TEST_FIELDS) - set(OPTIONAL_FIELDS) - {"candidates", "chance"}
        if name not in files or missing or unknown:
            raise UserError(f"{where}: card test {name!r}: " + ("no such file" if name not in files else
                            f"missing {missing}" if missing else f"unknown field(s) {sorted(unknown)}"))
        if spec["kind"] not in TEST_KINDS or spec["style"] not in ("nocot", "cot"):
            raise UserError(f"{where}: card test {name!r}: kind {spec['kind']!r} / style {spec['style']!r} "
                            f"not one of {TEST_KINDS} / (nocot, cot)")
        if spec.get("shuffled_of") and spec["shuffled_of"] not in card["tests"]:
            raise UserError(f"{where}: card test {name!r} is the shuffled baseline of unknown test {spec['shuffled_of']!r}")
        if spec["candidate_set"] not in card["candidate_sets"]:
            raise UserError(f"{where}: card test {name!r}: unknown candidate set {spec['candidate_set']!r}")


def write_dataset(out_dir, files: dict, card: dict, extras=None) -> dict:
    """Write every `name -> rows` file as `name.jsonl` plus `card.json`, all or nothing.

    `extras` maps further file names to their content: text as is, anything else as JSON.
    `card["tests"]` declares every test file (`test_spec`); counts and chance levels are added
    here so they always match what was written.
    """
    card = dict(card)
    card["files"] = {name: len(rows) for name, rows in sorted(files.items())}
    # Items answerable without composing (see shortcut_reason): readers report them apart.
    card["shortcuts"] = {name: n for name, rows in sorted(files.items())
                         if (n := sum(bool(r.get("shortcut")) for r in rows if isinstance(r, dict)))}
    check_card(card, files)
    for name, test in card.get("tests", {}).items():
        for key, default in OPTIONAL_FIELDS.items():
            test.setdefault(key, default)
        candidates = card["candidate_sets"][test["candidate_set"]]
        test["candidates"] = len(candidates)
        test["chance"] = 1.0 / len(candidates)
        missing = {row["answer"] for row in files[name]} - set(candidates)
        if missing:
            raise AssertionError(f"{name}: answers {sorted(missing)[:3]} are not in its candidate set")
    with atomic_directory(out_dir) as staging:
        for name, rows in files.items():
            path = staging / f"{name}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        for name, obj in {**(extras or {}), "card.json": card}.items():
            (staging / name).write_text(obj if isinstance(obj, str) else to_json(obj), encoding="utf-8")
    return card


def _tests(data_dir, keep) -> dict:
    """{test name: rows} of a generated dataset's tests whose card entry `keep` accepts."""
    card = json.loads((Path(data_dir) / "card.json").read_text(encoding="utf-8"))
    return {name: read_records(Path(data_dir) / f"{name}.jsonl") for name, spec in card["tests"].items() if keep(spec)}


def two_hop_tests(data_dir, style: str = "nocot") -> dict:
    """{test name: rows} of a generated dataset's two-hop tests in `style` (not their shuffled baselines)."""
    return _tests(data_dir, lambda spec: spec["kind"] == "two_hop" and spec["style"] == style and not spec["shuffled_of"])


def in_context_tests(data_dir, style: str = "nocot") -> dict:
    """{test name: rows} of a generated dataset's in-context tests (the facts in the prompt) in `style`."""
    return _tests(data_dir, lambda spec: spec["kind"] == "in_context" and spec["style"] == style)


def second_hop_tests(data_dir) -> dict:
    """{test name: rows} of a generated dataset's second-hop tests: questions about e2 with the relation r2
    (each row names its `e2`, and its `attribute` where the dataset has several)."""
    return _tests(data_dir, lambda spec: spec["kind"] == "hop_b")
