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

    python bench/induction_probe.py --phases names:600
    python bench/induction_probe.py --phases random:200,names:400
"""
import argparse
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.tiny import ALIASES, PRESETS, build_tiny_model  # noqa: E402
from twohop.data import tables  # noqa: E402
from twohop.data.base_corpus import base_last_parts, random_name  # noqa: E402


def word_pools(tokenizer) -> dict:
    first_names, last_parts = tables.names()
    last_parts = sorted({*last_parts, *base_last_parts()})
    return {"first_names": first_names, "last_parts": last_parts, "words": [*first_names, *last_parts, *tables.cities()],
            "vocab": vocabulary_words(tokenizer)}


def list_batches(tokenizer, pools: dict, data: str, rng: random.Random, batch_size: int, random_length: int):
    """One batch of [list, same list] token rows, every row cut to the batch's shortest list."""
    lists = []
    for _ in range(batch_size):
        if data == "random":
            lists.append([rng.randrange(len(tokenizer.all_special_ids), len(tokenizer)) for _ in range(random_length)])
        elif data in ("words", "vocab"):
            lists.append(tokenizer(" " + " ".join(rng.choices(pools[data], k=random_length)), add_special_tokens=False)["input_ids"])
        else:
            names = ", ".join(random_name(rng, pools["first_names"], pools["last_parts"]) for _ in range(6))
            lists.append(tokenizer(f" {names}.", add_special_tokens=False)["input_ids"])
    width = min(len(ids) for ids in lists)
    return torch.tensor([ids[:width] * 2 for ids in lists]), width


def vocabulary_words(tokenizer) -> list:
    """The vocabulary's whole-word tokens (a space, then letters): a list of them re-tokenizes to itself."""
    pieces = (tokenizer.convert_tokens_to_string([token]) for token in tokenizer.get_vocab())
    return sorted(piece[1:] for piece in pieces if re.fullmatch(r" [A-Za-z]+", piece))


def second_copy_loss(logits, ids, width: int) -> torch.Tensor:
    """Mean loss on the second copy's tokens after its first (the first is not predictable)."""
    predicted = logits[:, width:-1]
    return torch.nn.functional.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), ids[:, width + 1:].reshape(-1))


def phase_of_step(phases: list, step: int) -> str:
    """The kind of list trained at `step` ((kind, steps) phases in order; the last one continues)."""
    for kind, steps in phases:
        if step < steps:
            return kind
        step -= steps
    return phases[-1][0]


def parse_phases(text: str) -> list:
    kinds = ("random", "words", "vocab", "names")
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
    parser.add_argument("--phases", default="names:400", help="KIND:STEPS,... (kinds: random, words, vocab, names)")
    parser.add_argument("--preset", default="tiny-h128-l2", choices=sorted([*PRESETS, *ALIASES]),
                        help="embedded preset, built fresh into a temp folder")
    parser.add_argument("--batch_size", type=int, default=32, help="sequences per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (constant)")
    parser.add_argument("--random_length", type=int, default=24, help="tokens per random, words or vocab list")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights' init and of the lists")
    parser.add_argument("--every", type=int, default=50, help="print the loss every N steps")
    args = parser.parse_args()
    for name in ("batch_size", "random_length", "every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.lr <= 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    phases = parse_phases(args.phases)
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
        ids, width = list_batches(tokenizer, pools, data, rng, args.batch_size, args.random_length)
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        if step % args.every == 0:
            last = {"step": step, "data": data, "second_copy_loss": round(second_copy_loss(logits, ids, width).item(), 3)}
            print(json.dumps({**last, "seconds": round(time.time() - started)}), flush=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print(json.dumps({"phases": args.phases, "preset": args.preset, "seed": args.seed, "final": last}))


if __name__ == "__main__":
    main()
