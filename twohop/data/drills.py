"""Skill drills: synthetic rows that teach the tiny model to copy and to look a fact up in its prompt.

In-context lookup ("X's spouse is Y ... Who is X's spouse?") needs the model to find an earlier
occurrence of a name and copy what follows it: an induction head. The embedded tiny model does not
form one from the study's rows (bench/README.md, "Copying a repeated list"); these drills isolate the
skill, for `bench/induction_probe.py` and for the base's optional warm-up (`finetune_base`'s
`drill_phases`, trained by `twohop.training.drills`). Every drill is token rows with a mask of its
target tokens:
- copy kinds (a list, then the same list again; the target is the second copy after its first token):
  `random` (random token ids), `words` (entity words), `vocab` (whole-word vocabulary tokens), `names`
  (six random people from the project's name lists);
- key-value kinds (six facts, then keys asked again; the target is each asked value's first token):
  `kv`, `kv_is`, `kv_names_is`, `kv_names_question`, `kv_spouses`, `kv_spouses_born` inline, and one
  `<layout>_spouses_born` per prompt layout below (one question: the study's prompt, plain or through
  the chat template, and variations of its layout);
- two-hop kinds (`chat_two_hop`, `chat_two_hop_cot`): the study's own in-context test row (its prompt, a
  paraphrased two-hop question, 0-10 distractor couples) through the chat template, answered without
  or with a chain of thought; the target is the reply (its first token, or the whole chain).
People are random draws (a first name and two last-name parts), so a drill states no fact the study uses.
"""
import random
import re
from dataclasses import dataclass

from twohop.data import tables
from twohop.data.dataset import fresh_people, random_name
from twohop.data.records import record
from twohop.data.spouses import in_context_rows


def word_pools(tokenizer=None) -> dict:
    """What drills draw from: every name list (a drill's people are random, so they state no fact the study
    uses), the cities, and with a tokenizer its whole-word tokens (the `vocab` drill)."""
    first_names, last_parts = tables.names()
    last_parts = sorted({*last_parts, *tables.base_last_parts()})
    return {"first_names": first_names, "last_parts": last_parts, "cities": tables.cities(),
            "words": [*first_names, *last_parts, *tables.cities()],
            "vocab": vocabulary_words(tokenizer) if tokenizer else []}


COPY_KINDS = ("random", "words", "vocab", "names")


@dataclass(frozen=True)
class Layout:
    """How a one-question prompt is laid out (the study's in-context prompt by default): its header line
    ("Here are some facts:"), what joins the facts and what comes before the question, and whether it
    goes through the chat template ("system": with the no-CoT system prompt, "no_system": without;
    "": plain text, the value right after the question)."""
    header: bool = True
    between_facts: str = "\n"
    before_question: str = "\n\n"
    chat: str = ""


@dataclass(frozen=True)
class Lookup:
    """A key-value kind: what the keys and values are, how a fact and a question read, whether each
    value also gets a second fact (" VALUE was born in CITY.", shuffled in among the first), and the
    layout of a one-question prompt (None: facts then questions, inline)."""
    keys: str  # "first_name" (one token) or "person" (a whole name, several tokens)
    values: str  # "city" (one token) or "person"
    fact: str
    query: str
    born_facts: bool = False
    layout: Layout = None


PROMPT_LAYOUTS = {
    "prompt": Layout(),
    "lines": Layout(header=False),
    "lines_question_inline": Layout(header=False, before_question=" "),
    "inline_question_blank": Layout(header=False, between_facts=" "),
    "chat": Layout(chat="system"),
    "chat_no_system": Layout(chat="no_system"),
}
KEY_VALUE_KINDS = {
    "kv": Lookup("first_name", "city", " {key} {value}.", " {key} {value}."),
    "kv_is": Lookup("first_name", "city", " {key} is {value}.", " {key} is {value}."),
    "kv_names_is": Lookup("person", "city", " {key} is {value}.", " {key} is {value}."),
    "kv_names_question": Lookup("person", "city", " {key} is {value}.", " Where is {key}? {value}."),
    "kv_spouses": Lookup("person", "person", " {key}'s spouse is {value}.", " Who is {key}'s spouse? {value}."),
    "kv_spouses_born": Lookup("person", "person", " {key}'s spouse is {value}.", " Who is {key}'s spouse? {value}.",
                              born_facts=True),
    **{f"{name}_spouses_born": Lookup("person", "person", "{key}'s spouse is {value}.", "Who is {key}'s spouse?",
                                      born_facts=True, layout=layout)
       for name, layout in PROMPT_LAYOUTS.items()},
}
FACTS_PER_ROW = 6
TWO_HOP_KINDS = {"chat_two_hop": "nocot", "chat_two_hop_cot": "cot"}  # kind -> the study's reply style
MAX_DISTRACTORS = 10  # the in-context sweep's largest


def copy_rows(tokenizer, pools: dict, data: str, rng: random.Random, batch_size: int, lengths: tuple) -> list:
    """[list, same list] token rows, every list cut to the batch's shortest, and the mask of the second
    copy's tokens after its first (the first is not predictable). Random, words and vocab lists have a
    length in `lengths` (min, max), drawn once per batch."""
    lists = []
    random_length = rng.randint(*lengths) if lengths[0] < lengths[1] else lengths[1]
    for _ in range(batch_size):
        if data == "random":
            lists.append([rng.randrange(len(tokenizer.all_special_ids), len(tokenizer)) for _ in range(random_length)])
        elif data in ("words", "vocab"):
            lists.append(tokenizer(" " + " ".join(rng.choices(pools[data], k=random_length)), add_special_tokens=False)["input_ids"])
        else:
            names = ", ".join(random_name(rng, pools["first_names"], pools["last_parts"]) for _ in range(6))
            lists.append(tokenizer(f" {names}.", add_special_tokens=False)["input_ids"])
    width = min(len(ids) for ids in lists)
    return [(ids[:width] * 2, [False] * (width + 1) + [True] * (width - 1)) for ids in lists]


def entities(pools: dict, kind: str, rng: random.Random) -> list:
    """Six distinct first names or cities, or six random people."""
    if kind == "first_name":
        return rng.sample(pools["first_names"], FACTS_PER_ROW)
    if kind == "city":
        return rng.sample(pools["cities"], FACTS_PER_ROW)
    return [random_name(rng, pools["first_names"], pools["last_parts"]) for _ in range(FACTS_PER_ROW)]


def tokens_with_target(tokenizer, text: str, key: str, value: str, is_query: bool) -> tuple:
    """A sentence's token ids, and a mask marking the value's first token if it is a query (the lookup;
    the value's later tokens are a name's continuation, which copying alone gives)."""
    ids = tokenizer(text.format(key=key, value=value), add_special_tokens=False)["input_ids"]
    start = len(tokenizer(text[:text.index(" {value}")].format(key=key), add_special_tokens=False)["input_ids"])
    return ids, [is_query and i == start for i in range(len(ids))]


def lookup_facts(pools: dict, kind: Lookup, rng: random.Random) -> tuple:
    """The kind's six facts ((sentence, key, value), each spouse's birthplace shuffled in if it has them),
    its keys and values, and the order in which the keys are asked."""
    keys, values = entities(pools, kind.keys, rng), entities(pools, kind.values, rng)
    queries = rng.sample(range(FACTS_PER_ROW), FACTS_PER_ROW)
    facts = [(kind.fact, keys[i], values[i]) for i in range(FACTS_PER_ROW)]
    if kind.born_facts:
        facts += [(" {key} was born in {value}.", value, city) for value, city in zip(values, entities(pools, "city", rng))]
        rng.shuffle(facts)
    return facts, keys, values, queries


def key_value_row(tokenizer, pools: dict, data: str, rng: random.Random, questions: int) -> tuple:
    """The kind's six facts, then `questions` of its six questions in another order, each followed by
    its value; the mask marks the first token of each value in that second part."""
    kind = KEY_VALUE_KINDS[data]
    facts, keys, values, queries = lookup_facts(pools, kind, rng)
    if kind.layout:
        return prompt_row(tokenizer, kind.layout, facts, kind.query.format(key=keys[queries[0]]), values[queries[0]])
    ids, mask = [], []
    for text, key, value, is_query in [(*f, False) for f in facts] + [(kind.query, keys[i], values[i], True)
                                                                      for i in queries[:questions]]:
        sentence, targets = tokens_with_target(tokenizer, text, key, value, is_query)
        ids += sentence
        mask += targets
    return ids, mask


def prompt_text(layout: Layout, facts: list, question: str) -> str:
    """A one-question prompt: its facts in `layout`, then the question."""
    # "Here are some facts:\n{facts}\n\n{question}"
    template = tables.parsed_templates("spouses")["in_context_prompt"]
    header = template[:template.index("{facts}")] if layout.header else ""
    facts = layout.between_facts.join(text.strip().format(key=key, value=value) for text, key, value in facts)
    return header + facts + layout.before_question + question


def lookup_records(count: int, rng: random.Random) -> list:
    """The `chat_spouses_born` drill as chat records: the study's in-context prompt over six fresh random
    couples (each spouse's birthplace shuffled in), one spouse question, the no-CoT system prompt, the
    spouse as the reply."""
    kind, pools = KEY_VALUE_KINDS["chat_spouses_born"], word_pools()
    system = tables.templates("system_prompts")["nocot"]
    rows = []
    for _ in range(count):
        facts, keys, values, queries = lookup_facts(pools, kind, rng)
        question = prompt_text(kind.layout, facts, kind.query.format(key=keys[queries[0]]))
        rows.append(record(question, values[queries[0]], values[queries[0]], system=system))
    return rows


def prompt_row(tokenizer, layout: Layout, facts: list, question: str, reply: str) -> tuple:
    """One question's prompt (its facts in `layout`) and its reply; the mask marks the reply's first token."""
    user = prompt_text(layout, facts, question)
    if not layout.chat:
        prompt = tokenizer(user, add_special_tokens=False)["input_ids"]
        ids = prompt + tokenizer(f" {reply}.", add_special_tokens=False)["input_ids"]
        return ids, [i == len(prompt) for i in range(len(ids))]
    system = tables.parsed_templates("system_prompts")["nocot"] if layout.chat == "system" else ""
    return chat_row(tokenizer, system, user, reply, whole_reply=False)


def chat_row(tokenizer, system: str, user: str, reply: str, whole_reply: bool) -> tuple:
    """A chat (no system turn if `system` is empty) and its reply; the mask marks the reply's first token, or
    with `whole_reply` every token of it (a chain of thought) up to its end-of-turn."""
    messages = [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": user}]
    ids = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}], return_dict=True)["input_ids"]
    start = len(ids) - ids[::-1].index(tokenizer.convert_tokens_to_ids("<|assistant|>"))  # the reply's first token
    end = ids.index(tokenizer.convert_tokens_to_ids("<|eot|>"), start) if whole_reply else start + 1
    return ids, [start <= i < end for i in range(len(ids))]


def two_hop_row(tokenizer, data: str, rng: random.Random) -> tuple:
    """The study's in-context test row over fresh random couples: a target couple and 0-10 distractor
    couples (each spouse's birthplace stated), one of its two-hop questions, and the reply in the kind's
    style (the city, or the chain of thought)."""
    n_distractors = rng.randint(0, MAX_DISTRACTORS)
    triplets = fresh_people(rng, n_distractors + 1)
    style = TWO_HOP_KINDS[data]
    # Read-only, so the cached templates, not a copy a row (rows are built for every step)
    templates, system_prompts = tables.parsed_templates("spouses"), tables.parsed_templates("system_prompts")
    (row,) = in_context_rows(triplets, triplets[:1], templates, system_prompts,
                             n_distractors, seed=rng.randrange(2 ** 32), style=style)
    system, user, reply = (message["content"] for message in row["messages"])
    return chat_row(tokenizer, system, user, reply, whole_reply=style == "cot")


def drill_rows(tokenizer, pools: dict, data: str, rng: random.Random, batch_size: int, lengths: tuple,
               questions: int = FACTS_PER_ROW) -> list:
    """`batch_size` rows of the drill `data`: (token ids, the mask of its target tokens) each."""
    if data in KEY_VALUE_KINDS:
        return [key_value_row(tokenizer, pools, data, rng, questions) for _ in range(batch_size)]
    if data in TWO_HOP_KINDS:
        return [two_hop_row(tokenizer, data, rng) for _ in range(batch_size)]
    return copy_rows(tokenizer, pools, data, rng, batch_size, lengths)


def vocabulary_words(tokenizer) -> list:
    """The vocabulary's whole-word tokens (a space, then letters): a list of them re-tokenizes to itself."""
    pieces = (tokenizer.convert_tokens_to_string([token]) for token in tokenizer.get_vocab())
    return sorted(piece[1:] for piece in pieces if re.fullmatch(r" [A-Za-z]+", piece))
