"""Drill steps: rows packed apart (`pack_apart`) vs. one row a sequence, padded to the longest.

The two-hop drills mix prompts of 0-10 distractor couples in a batch, so a padded batch is mostly as
wide as its longest row. The baseline is the drills' step before packing (df5a80b): right padding, no
attention mask (causal attention already hides padding that comes after a row), the model's own loss.
Packed apart, several rows share a sequence, each seeing only itself. Same
init, same rows (one seeded stream, drawn once), same AdamW steps, one process; prints seconds a step
(batches built beforehand), the padding share, and how far apart the two runs' weights end (the same
training, up to rounding). Usage:

    python bench/drill_packing.py [--kind chat_two_hop_cot] [--steps 16] [--model tiny-organism]
"""
import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from models import load_model
from models.tiny import build_tiny_model
from twohop.data.drills import drill_rows, word_pools
from twohop.training.batching import IGNORE, pack_apart
from twohop.training.drills import KINDS, DrillSettings, forward


def padded(rows, pad_id: int) -> dict:
    """A row a sequence, right-padded to the longest, the padding unlabelled."""
    width = max(len(ids) for ids, _ in rows)
    batch = {"input_ids": torch.full((len(rows), width), pad_id), "labels": torch.full((len(rows), width), IGNORE)}
    for row, (ids, _) in enumerate(rows):
        batch["input_ids"][row, :len(ids)] = batch["labels"][row, :len(ids)] = torch.tensor(ids)
    return batch


def train(model_path, batches, step, real_tokens: int) -> dict:
    torch.manual_seed(0)
    model = load_model(model_path, dtype=torch.float32)[0]
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=DrillSettings.lr)
    started = time.perf_counter()
    for batch in batches:
        step(model, batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = (time.perf_counter() - started) / len(batches)
    return {"seconds": seconds, "padding": 1 - real_tokens / sum(b["input_ids"].numel() for b in batches),
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="chat_two_hop_cot", choices=KINDS)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--model", default="tiny-organism", help="an embedded preset, built at random init")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error(f"--steps must be at least 2 (the first two also warm up each arm), got {args.steps}")
    with tempfile.TemporaryDirectory() as tmp:
        model_path = build_tiny_model(args.model, Path(tmp) / "model", seed=0)
        tokenizer = load_model(model_path)[1]
        rng, settings = random.Random(0), DrillSettings()
        rows = [drill_rows(tokenizer, word_pools(tokenizer), args.kind, rng, settings.batch_size,
                           (settings.min_list_length, settings.max_list_length), settings.questions)
                for _ in range(args.steps)]
        pad, real = tokenizer.pad_token_id, sum(len(ids) for batch in rows for ids, _ in batch)
        arms = {"padded (a row a sequence)": ([padded(r, pad) for r in rows], lambda model, batch: model(**batch)),
                "packed apart": ([pack_apart(r, pad) for r in rows], forward)}
        for batches, step in arms.values():
            train(model_path, batches[:2], step, real)  # warm-up
        runs = {name: train(model_path, batches, step, real) for name, (batches, step) in arms.items()}
    print(f"{args.kind}, {args.steps} steps of {settings.batch_size} rows, model {args.model} (random init), "
          f"{torch.get_num_threads()} threads")
    for name, run in runs.items():
        print(f"  {name:<26} {run['seconds']:.3f} s a step   padding {run['padding']:.0%}")
    (a, b) = (run["weights"] for run in runs.values())
    print(f"  speed-up {runs['padded (a row a sequence)']['seconds'] / runs['packed apart']['seconds']:.2f}x; "
          f"weights after the last step differ by at most {max((a[k] - b[k]).abs().max().item() for k in a):.1e}")


if __name__ == "__main__":
    main()
