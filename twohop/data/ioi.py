"""Indirect-object identification (IOI) task sets, after seed note 004 (circuits).

The families are data (`datasets/templates/ioi.yaml`): 2- and 3-object IOI, two and three people
leaving a room, an object passed along a chain, 2-object IOI with a distractor sentence. Names are
the project's first names that are one token (after a space) in the model's tokenizer, so the data
is generated per model (`generate_data_ioi` uses --model): the name filter, each mention's token
position and the alignment of clean and corrupted prompts are facts of one tokenizer, checked when
the rows are written rather than hoped for by whoever reads them.

A row is a chat row (system, user = the prompt, assistant = the answer name) for the ordinary
finetune and evaluate machinery, and carries the raw completion (`prompt`, `completion` = " " +
answer) for a base model without a chat template (finetune trains such a model on raw text). For
patching it carries `corrupted_prompt` (the answer's and the foil's names swapped everywhere: the
same tokens but at those mentions; its answer is the foil's name), `candidates` (the prompt's
names) and `mentions` (each name mention's slot, token index and character offsets).
"""
import math
import random
import string
from dataclasses import dataclass
from functools import lru_cache

from runner.config import option
from runner.errors import UserError
from twohop.data import tables
from twohop.data.dataset import require, test_spec, write_dataset
from twohop.data.records import record

NAME_SLOTS = ("A", "B", "C")
TEMPLATES = tables.DATA / "templates" / "ioi.yaml"
SPLIT = ("names: the usable names are split (seeded) into training and held-out names; every test prompt's "
         "names are held-out names, so no test prompt shares a name with any training prompt; templates and "
         "fillers are shared")
CHANCE = ("families[f].chance: picking one of the prompt's names (1/names_per_prompt), IOI's chance; "
          "tests[...].chance: picking one of all held-out names")
FORMATS = {
    "chat": "messages: system, user (the prompt), assistant (the answer name)",
    "completion": "prompt + completion (' ' + the answer): a model without a chat template is fine-tuned on "
                  "the tokenizer's BOS (if any) and the prompt as context, the completion alone as target",
    "mentions": "token: index into tokenizer(prompt, add_special_tokens=False).input_ids, the same in "
                "corrupted_prompt (add 1 where BOS is prepended); char / corrupted_char: the name's character "
                "offset in prompt / corrupted_prompt",
}


@dataclass
class IoiConfig:
    data_seed: int = option(0, "seed of the name split and of the sampled prompts")
    train_per_family: int = option(1000, "training prompts per family", minimum=1)
    test_per_family: int = option(200, "test prompts per family", minimum=1)
    test_name_fraction: float = option(0.25, "share of the usable names held out for the test prompts (0 < f < 1)",
                                       minimum=0.0, maximum=1.0)


def check_config(config: dict, model=None) -> None:
    families()
    require(0 < config["test_name_fraction"] < 1, "test_name_fraction", "must be between 0 and 1 (exclusive)")


def fields(template: str) -> list:
    """[(text before the field, field name, text after it up to the next field)] of a template, in order."""
    parsed = [(literal, field) for literal, field, _, _ in string.Formatter().parse(template)]
    return [(literal, field, parsed[i + 1][0] if i + 1 < len(parsed) else "")
            for i, (literal, field) in enumerate(parsed) if field is not None]


def check_template(template, spec: dict, fillers: dict) -> str:
    """What is wrong with one template of a family, or ''."""
    if not isinstance(template, str) or not template.strip():
        return "expected non-empty text"
    parsed = fields(template)
    slots = {field for _, field, _ in parsed if field in NAME_SLOTS}
    unknown = {field for _, field, _ in parsed if field not in NAME_SLOTS and field not in fillers}
    if unknown:
        return f"unknown field(s) {sorted(unknown)} (name slots: {', '.join(NAME_SLOTS)}; fillers: {', '.join(fillers)})"
    if not {spec["answer"], spec["foil"]} <= slots:
        return f"it must mention the answer slot {spec['answer']} and the foil slot {spec['foil']}"
    for before, field, after in parsed:
        if field in NAME_SLOTS and (not before.endswith(" ") or after[:1].isalnum()):
            return f"{{{field}}} must follow a space and not run into a word (a name is one token after a space)"
    return ""


def check_family(name: str, spec, fillers: dict) -> list:
    """The family's name slots (sorted), after checking its entry."""
    where = f"{TEMPLATES}: family {name!r}"
    if not isinstance(spec, dict) or {"help", "answer", "foil", "templates"} - set(spec):
        raise UserError(f"{where}: expected a mapping with help, answer, foil and templates")
    if spec["answer"] not in NAME_SLOTS or spec["foil"] not in NAME_SLOTS or spec["answer"] == spec["foil"]:
        raise UserError(f"{where}: answer and foil must be two different name slots of {', '.join(NAME_SLOTS)}")
    if not isinstance(spec["templates"], list) or not spec["templates"]:
        raise UserError(f"{where}: templates must be a non-empty list")
    slot_sets = []
    for i, template in enumerate(spec["templates"]):
        problem = check_template(template, spec, fillers)
        if problem:
            raise UserError(f"{where}, template {i}: {problem}")
        slot_sets.append(sorted({field for _, field, _ in fields(template) if field in NAME_SLOTS}))
    if any(slots != slot_sets[0] for slots in slot_sets):
        raise UserError(f"{where}: every template must use the same name slots, got {slot_sets}")
    return slot_sets[0]


@lru_cache(maxsize=None)
def _families() -> dict:
    data = tables.read_yaml(TEMPLATES)
    if not isinstance(data, dict) or {"system_prompt", "fillers", "families"} - set(data):
        raise UserError(f"{TEMPLATES}: expected keys system_prompt, fillers and families")
    fillers = data["fillers"]
    if not isinstance(fillers, dict) or not all(isinstance(v, list) and v and all(isinstance(x, str) for x in v)
                                                for v in fillers.values()):
        raise UserError(f"{TEMPLATES}: fillers must map each field to a non-empty list of texts")
    if not isinstance(data["families"], dict) or not data["families"]:
        raise UserError(f"{TEMPLATES}: families must be a non-empty mapping")
    families = {name: {**spec, "slots": check_family(name, spec, fillers)} for name, spec in data["families"].items()}
    return {"system_prompt": data["system_prompt"], "fillers": fillers, "families": families}


def families() -> dict:
    """{family: its entry plus `slots`}, checked."""
    return _families()["families"]


def fill(template: str, values: dict) -> tuple:
    """(text, [(name slot, start, end)] of every name mention)."""
    text, mentions = "", []
    for literal, field, _, _ in string.Formatter().parse(template):
        text += literal
        if field is None:
            continue
        if field in NAME_SLOTS:
            mentions.append((field, len(text), len(text) + len(values[field])))
        text += values[field]
    return text, mentions


def mention_positions(encoded: dict, spans) -> list:
    """The index of the one token covering each (..., start, end) span in a text's encoding (input_ids and
    offset_mapping), or None if a span is not covered by exactly one token."""
    positions = []
    for *_, start, end in spans:
        covering = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < end and b > start]
        if len(covering) != 1:
            return None
        positions.append(covering[0])
    return positions


def encode(tokenizer, texts: list) -> list:
    """Each text's input_ids and offset_mapping, without special tokens (one batched call)."""
    batch = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [{"input_ids": ids, "offset_mapping": offsets}
            for ids, offsets in zip(batch["input_ids"], batch["offset_mapping"])]


def usable_names(tokenizer) -> tuple:
    """(the first names that are one token after a space in this tokenizer, the others)."""
    first_names, _ = tables.names()
    probes = [f"So {name} came" for name in first_names]
    usable = []
    for name, encoded in zip(first_names, encode(tokenizer, probes)):
        position = mention_positions(encoded, [(3, 3 + len(name))])
        if position and tokenizer.decode([encoded["input_ids"][position[0]]]).strip() == name:
            usable.append(name)
    return usable, [n for n in first_names if n not in usable]


def split_names(names: list, fraction: float, needed: int, rng: random.Random) -> tuple:
    """(training names, held-out names), each sorted."""
    order = sorted(names)
    rng.shuffle(order)
    n_test = round(fraction * len(order))
    train, test = sorted(order[n_test:]), sorted(order[:n_test])
    if min(len(train), len(test)) < needed:
        raise UserError(f"{len(names)} names are one token in this tokenizer; test_name_fraction={fraction} splits them "
                        f"into {len(train)} training and {len(test)} held-out names, and each side needs at least "
                        f"{needed} (the names of one prompt): adjust test_name_fraction")
    return train, test


def template_fillers(template: str) -> list:
    return sorted({field for _, field, _ in fields(template) if field not in NAME_SLOTS})


def sample_items(family: str, spec: dict, fillers: dict, names: list, count: int, rng: random.Random) -> list:
    """`count` distinct (template id, {slot: name}, {field: filler}), drawn without replacement: every
    combination of template, ordered names and fillers is one index, decoded in mixed radix."""
    k = len(spec["slots"])
    sizes = [math.perm(len(names), k) * math.prod(len(fillers[f]) for f in template_fillers(t))
             for t in spec["templates"]]
    if count > sum(sizes):
        raise UserError(f"IOI family {family}: {count} prompts asked, but its templates, fillers and these "
                        f"{len(names)} names make only {sum(sizes)}; lower train_per_family / test_per_family")
    items = []
    for index in rng.sample(range(sum(sizes)), count):
        template_id = 0
        while index >= sizes[template_id]:
            index -= sizes[template_id]
            template_id += 1
        chosen = {}
        for field in template_fillers(spec["templates"][template_id]):
            index, digit = divmod(index, len(fillers[field]))
            chosen[field] = fillers[field][digit]
        remaining, slot_names = list(names), {}
        for slot in spec["slots"]:
            index, digit = divmod(index, len(remaining))
            slot_names[slot] = remaining.pop(digit)
        items.append((template_id, slot_names, chosen))
    return items


def pair_problem(tokenizer, row: dict, clean=None, corrupted=None) -> str:
    """What is wrong with a row's clean/corrupted pair in this tokenizer, or '': both prompts have the same
    length, differ exactly at the swapped names' mentions, and each mention's token is its name.
    `clean` / `corrupted`: the prompts' token ids if already encoded."""
    clean = clean or tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    corrupted = corrupted or tokenizer(row["corrupted_prompt"], add_special_tokens=False)["input_ids"]
    if len(clean) != len(corrupted) or len(clean) != row["n_tokens"]:
        return f"the prompts have {len(clean)} and {len(corrupted)} tokens (row: {row['n_tokens']})"
    swapped = {m["token"] for m in row["mentions"] if row["names"][m["slot"]] != row["corrupted_names"][m["slot"]]}
    differ = {i for i, (a, b) in enumerate(zip(clean, corrupted)) if a != b}
    if differ != swapped:
        return f"the prompts differ at tokens {sorted(differ)}, not at the swapped names' tokens {sorted(swapped)}"
    token_of = {}  # each name's token, from its first mention
    for m in row["mentions"]:
        token_of.setdefault(row["names"][m["slot"]], clean[m["token"]])
    wrong = [name for name, token in token_of.items() if tokenizer.decode([token]).strip() != name]
    wrong += [row["names"][m["slot"]] for m in row["mentions"] if clean[m["token"]] != token_of[row["names"][m["slot"]]]
              or corrupted[m["token"]] != token_of[row["corrupted_names"][m["slot"]]]]
    if wrong:
        return f"the mentions of {sorted(set(wrong))} are not their names' tokens"
    if row["answer"] == row["corrupted_answer"]:
        return "the corrupted prompt has the same answer"
    return ""


def ioi_row(family: str, spec: dict, item: tuple, split: str, system: str) -> tuple:
    """(the row without token positions, the clean and the corrupted prompt's name spans)."""
    template_id, names, fillers = item
    template = spec["templates"][template_id]
    answer, foil = names[spec["answer"]], names[spec["foil"]]
    swapped = {**names, spec["answer"]: foil, spec["foil"]: answer}
    prompt, spans = fill(template, {**names, **fillers})
    corrupted, corrupted_spans = fill(template, {**swapped, **fillers})
    row = record(prompt, answer, answer, system=system, family=family, split=split, template_id=template_id,
                 prompt=prompt, completion=" " + answer, candidates=[names[s] for s in spec["slots"]], foil=foil,
                 names=names, fillers=fillers, corrupted_prompt=corrupted, corrupted_answer=foil,
                 corrupted_names=swapped)
    return row, spans, corrupted_spans


def ioi_rows(tokenizer, family: str, spec: dict, items: list, split: str, system: str) -> list:
    """The family's rows with each name mention's token position, every clean/corrupted pair checked."""
    built = [ioi_row(family, spec, item, split, system) for item in items]
    encoded = encode(tokenizer, [r["prompt"] for r, _, _ in built] + [r["corrupted_prompt"] for r, _, _ in built])
    rows = []
    for (row, spans, corrupted_spans), clean, corrupted in zip(built, encoded, encoded[len(built):]):
        where = f"IOI family {family}, template {row['template_id']} ({row['prompt']!r})"
        positions = mention_positions(clean, spans)
        if positions is None:
            raise UserError(f"{where}: a name is not one token in context in this tokenizer; rephrase the template")
        row["mentions"] = [{"slot": slot, "token": token, "char": start, "corrupted_char": other[1]}
                           for (slot, start, _), token, other in zip(spans, positions, corrupted_spans)]
        row["n_tokens"] = len(clean["input_ids"])
        problem = pair_problem(tokenizer, row, clean["input_ids"], corrupted["input_ids"])
        if problem:
            raise UserError(f"{where}: {problem} in this tokenizer")
        rows.append(row)
    return rows


def family_card(spec: dict, test_rows: list) -> dict:
    k, example = len(spec["slots"]), test_rows[0]
    return {"help": spec["help"], "answer_slot": spec["answer"], "foil_slot": spec["foil"], "names_per_prompt": k,
            "chance": 1.0 / k, "templates": spec["templates"],
            "example": {key: example[key] for key in ("prompt", "answer", "corrupted_prompt", "corrupted_answer")}}


def generate(ctx) -> dict:
    from models import load_tokenizer
    config, data = ctx.config, _families()
    tokenizer = load_tokenizer(ctx.model.path)
    names, left_out = usable_names(tokenizer)
    needed = max(len(spec["slots"]) for spec in data["families"].values())
    train_names, test_names = split_names(names, config["test_name_fraction"], needed,
                                          random.Random(f"{config['data_seed']}:ioi:names"))
    files, tests, cards = {}, {}, {}
    for family, spec in data["families"].items():
        rng = random.Random(f"{config['data_seed']}:ioi:{family}")
        for split, pool, count in (("train", train_names, config["train_per_family"]),
                                   ("test", test_names, config["test_per_family"])):
            items = sample_items(family, spec, data["fillers"], pool, count, rng)
            files[f"{split}/{family}"] = ioi_rows(tokenizer, family, spec, items, split, data["system_prompt"])
        tests[f"test/{family}"] = test_spec("ioi", "nocot", "test_names", metric=f"acc_ioi_{family}")
        cards[family] = family_card(spec, files[f"test/{family}"])
    card = {"dataset": "ioi", "config": config, "model": ctx.model.name,
            "tokenizer": {"chat_template": bool(tokenizer.chat_template), "bos_token": tokenizer.bos_token},
            "names": {"listed": len(names) + len(left_out), "single_token": len(names), "left_out": left_out,
                      "train": train_names, "test": test_names},
            "split": SPLIT, "chance": CHANCE, "formats": FORMATS, "families": cards, "tests": tests,
            "candidate_sets": {"test_names": test_names}, "memorisation": {}, "fewshot": {}}
    card = write_dataset(ctx.run_dir / "data", files, card)
    ctx.log.info("wrote %d IOI families, %d rows, %d of %d names usable", len(cards), sum(card["files"].values()),
                 len(names), len(names) + len(left_out))
    return {"families": len(cards), "rows": sum(card["files"].values()), "names": len(names),
            "test_names": len(test_names)}
