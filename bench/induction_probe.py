"""Does the embedded tiny model learn to copy a repeated sequence (an induction head), and on what data?

In-context lookup ("X's spouse is Y ... Who is X's spouse?") needs the model to find an earlier
occurrence of a name and copy what follows it. This probe isolates that skill: a fresh tiny model is
trained with plain PyTorch (full next-token loss, AdamW, clipping at 1.0) on sequences that are a
random list followed by the same list again, and it prints the loss on the second copy, which only
copying can bring down. Each phase trains on one kind of list (`--phases KIND:STEPS,...`):
- `random`: random token ids from the vocabulary (the textbook setting);
- `words`: random entity words (first names, last-name parts, cities: one token each), as text;
- `vocab`: random whole-word tokens of the vocabulary (" " + letters: each is one token, as text);
- `names`: six random people built from the project's name lists ("Ulla Ravenscroft-Szymanski"),
  the kind of name the study asks the model to look up.
The key-value kinds are lookup itself: six facts "KEY SEPARATOR VALUE." with distinct keys and values,
then the six keys again in another order, each followed by its fact or asked about; the printed loss
is on the values of that second part, which only finding the key's earlier fact can bring down:
- `kv`: one-token keys (first names), the city right after the key (" Ulla Oslo.");
- `kv_is`: one-token keys, " is" between key and city (" Ulla is Oslo.");
- `kv_names_is`: whole people as keys, " is" between (" Ulla Ravenscroft-Szymanski is Oslo.");
- `kv_names_question`: the same facts, asked as " Where is Ulla Ravenscroft-Szymanski? Oslo." (the key
  is no longer right before the city, as in the study's questions);
- `kv_spouses`: the study's first fact and question, people on both sides (" Ulla Ravenscroft-Szymanski's
  spouse is Aiko Pemberton-Banerjee.", " Who is Ulla Ravenscroft-Szymanski's spouse? Aiko ...");
- `kv_spouses_born`: the same, with each spouse's second fact (" Aiko Pemberton-Banerjee was born in
  Oslo.") shuffled in among the facts, as in the study's prompts;
- `chat_spouses_born`: the same facts and one question in the study's own in-context prompt, rendered
  by the model's chat template with the no-CoT system prompt; the value is the assistant's reply;
- `chat_no_system_spouses_born`: the same without the system prompt (the user turn, then the reply);
- `prompt_spouses_born`: the study's in-context prompt as plain text, no chat template ("Here are some
  facts:", one fact a line, a blank line, the question), the value right after the question;
- `lines_spouses_born`: the same without the "Here are some facts:" line;
- `lines_question_inline_spouses_born`: one fact a line, then the question after a space (no blank line);
- `inline_question_blank_spouses_born`: the facts inline (as in `kv_spouses_born`), then a blank line and
  the question.
Their printed loss and accuracy are on the first token of each recalled value (a city is one token).

    python bench/induction_probe.py --phases names:600
    python bench/induction_probe.py --phases random:200,names:400
    python bench/induction_probe.py --phases kv:300,kv_is:300
"""
import argparse
import json
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.tiny import ALIASES, PRESETS, build_tiny_model  # noqa: E402
from twohop.data import tables  # noqa: E402
from twohop.data.base_corpus import base_last_parts, random_name  # noqa: E402


def word_pools(tokenizer) -> dict:
    first_names, last_parts = tables.names()
    last_parts = sorted({*last_parts, *base_last_parts()})
    return {"first_names": first_names, "last_parts": last_parts, "cities": tables.cities(),
            "words": [*first_names, *last_parts, *tables.cities()], "vocab": vocabulary_words(tokenizer)}


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


def key_value_row(tokenizer, pools: dict, data: str, rng: random.Random, questions: int) -> tuple:
    """The kind's six facts, then `questions` of its six questions in another order, each followed by
    its value; the mask marks the first token of each value in that second part."""
    kind = KEY_VALUE_KINDS[data]
    keys, values = entities(pools, kind.keys, rng), entities(pools, kind.values, rng)
    queries = rng.sample(range(FACTS_PER_ROW), FACTS_PER_ROW)[:questions]
    facts = [(kind.fact, keys[i], values[i]) for i in range(FACTS_PER_ROW)]
    if kind.born_facts:
        facts += [(" {key} was born in {value}.", value, city) for value, city in zip(values, entities(pools, "city", rng))]
        rng.shuffle(facts)
    if kind.layout:
        return prompt_row(tokenizer, kind.layout, facts, kind.query.format(key=keys[queries[0]]), values[queries[0]])
    ids, mask = [], []
    for text, key, value, is_query in [(*f, False) for f in facts] + [(kind.query, keys[i], values[i], True) for i in queries]:
        sentence, targets = tokens_with_target(tokenizer, text, key, value, is_query)
        ids += sentence
        mask += targets
    return ids, mask


def prompt_row(tokenizer, layout: Layout, facts: list, question: str, reply: str) -> tuple:
    """One question's prompt (its facts in `layout`) and its reply; the mask marks the reply's first token."""
    template = tables.templates("spouses")["in_context_prompt"]  # "Here are some facts:\n{facts}\n\n{question}"
    header = template[:template.index("{facts}")] if layout.header else ""
    user = header + layout.between_facts.join(text.strip().format(key=key, value=value) for text, key, value in facts)
    user += layout.before_question + question
    if not layout.chat:
        prompt = tokenizer(user, add_special_tokens=False)["input_ids"]
        ids = prompt + tokenizer(f" {reply}.", add_special_tokens=False)["input_ids"]
        return ids, [i == len(prompt) for i in range(len(ids))]
    system = [{"role": "system", "content": tables.templates("system_prompts")["nocot"]}] if layout.chat == "system" else []
    messages = [*system, {"role": "user", "content": user}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    ids = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}], return_dict=True)["input_ids"]
    return ids, [i == len(prompt) for i in range(len(ids))]


def batch_of(tokenizer, pools: dict, data: str, rng: random.Random, batch_size: int, lengths: tuple,
             questions: int = FACTS_PER_ROW) -> tuple:
    """(token ids [batch, width], next-token labels with -100 at padding, the mask of target tokens)."""
    if data in KEY_VALUE_KINDS:
        rows = [key_value_row(tokenizer, pools, data, rng, questions) for _ in range(batch_size)]
    else:
        rows = copy_rows(tokenizer, pools, data, rng, batch_size, lengths)
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((batch_size, width), tokenizer.pad_token_id)
    labels = torch.full((batch_size, width), -100)
    targets = torch.zeros((batch_size, width), dtype=torch.bool)
    for row, (row_ids, row_mask) in enumerate(rows):
        ids[row, :len(row_ids)] = labels[row, :len(row_ids)] = torch.tensor(row_ids)
        targets[row, :len(row_mask)] = torch.tensor(row_mask)
    return ids, labels, targets


def vocabulary_words(tokenizer) -> list:
    """The vocabulary's whole-word tokens (a space, then letters): a list of them re-tokenizes to itself."""
    pieces = (tokenizer.convert_tokens_to_string([token]) for token in tokenizer.get_vocab())
    return sorted(piece[1:] for piece in pieces if re.fullmatch(r" [A-Za-z]+", piece))


def target_loss_and_accuracy(logits, ids, targets) -> tuple:
    """Mean loss and argmax accuracy on the target tokens (the second copy, or each looked-up value's first token)."""
    predicted, wanted = logits[:, :-1][targets[:, 1:]], ids[:, 1:][targets[:, 1:]]
    loss = torch.nn.functional.cross_entropy(predicted, wanted)
    return loss.item(), (predicted.argmax(-1) == wanted).float().mean().item()


def phase_of_step(phases: list, step: int) -> str:
    """The kind of list trained at `step` ((kind, steps) phases in order; the last one continues)."""
    for kind, steps in phases:
        if step < steps:
            return kind
        step -= steps
    return phases[-1][0]


def parse_phases(text: str) -> list:
    kinds = (*COPY_KINDS, *KEY_VALUE_KINDS)
    phases = []
    for part in text.split(","):
        kind, _, steps = part.partition(":")
        if kind not in kinds or not steps.isdigit() or int(steps) < 1:
            raise SystemExit(f"--phases: {part!r} is not KIND:STEPS with KIND one of {', '.join(kinds)} and "
                             "STEPS a positive integer (e.g. random:200,names:400)")
        phases.append((kind, int(steps)))
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phases", default="names:400", help="KIND:STEPS,... (kinds: " + ", ".join([*COPY_KINDS, *KEY_VALUE_KINDS]) + ")")
    parser.add_argument("--preset", default="tiny-h128-l2", choices=sorted([*PRESETS, *ALIASES]),
                        help="embedded preset, built fresh into a temp folder")
    parser.add_argument("--batch_size", type=int, default=32, help="sequences per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (constant)")
    parser.add_argument("--random_length", type=int, default=24, help="tokens per random, words or vocab list")
    parser.add_argument("--min_random_length", type=int, default=None,
                        help="if set, each batch's random, words or vocab lists have a length drawn from "
                             "[this, --random_length], so the copy is no longer at a fixed distance")
    parser.add_argument("--questions", type=int, default=FACTS_PER_ROW,
                        help=f"inline key-value kinds: questions per row, 1-{FACTS_PER_ROW} (the study asks one); "
                             "the prompt-layout kinds always ask one")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights' init and of the lists")
    parser.add_argument("--every", type=int, default=50, help="print the loss every N steps")
    args = parser.parse_args()
    if args.min_random_length is None:
        args.min_random_length = args.random_length
    for name in ("batch_size", "random_length", "min_random_length", "every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if not 1 <= args.questions <= FACTS_PER_ROW:
        parser.error(f"--questions must be between 1 and {FACTS_PER_ROW}, got {args.questions}")
    if args.min_random_length > args.random_length:
        parser.error(f"--min_random_length ({args.min_random_length}) is above --random_length ({args.random_length})")
    if args.lr <= 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    phases = parse_phases(args.phases)
    layout_kinds = [kind for kind, _ in phases if kind in KEY_VALUE_KINDS and KEY_VALUE_KINDS[kind].layout]
    if layout_kinds and args.questions not in (1, FACTS_PER_ROW):
        parser.error(f"--questions {args.questions}: {layout_kinds[0]} asks one question per prompt; use --questions 1")
    total_steps = sum(steps for _, steps in phases)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as folder:
        build_tiny_model(args.preset, folder, seed=args.seed)
        tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    pools = word_pools(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    started, last = time.time(), None
    for step in range(total_steps + 1):
        data = phase_of_step(phases, step)
        ids, labels, targets = batch_of(tokenizer, pools, data, rng, args.batch_size,
                                        (args.min_random_length, args.random_length), args.questions)
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        if step % args.every == 0:
            target_loss, accuracy = target_loss_and_accuracy(logits, ids, targets)
            last = {"step": step, "data": data, "target_loss": round(target_loss, 3), "target_accuracy": round(accuracy, 3)}
            print(json.dumps({**last, "seconds": round(time.time() - started)}), flush=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print(json.dumps({"phases": args.phases, "preset": args.preset, "seed": args.seed, "final": last}))


if __name__ == "__main__":
    main()
