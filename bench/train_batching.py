"""Training throughput: length-grouped batches vs. random batches padded to the longest row.

Same model, same rows, same number of optimizer steps, one process; prints real (non-padding)
tokens per second for both and the ratio. Usage:

    python bench/train_batching.py --workspace_path W [--steps 60] [--batch_size 32] [--model tiny]

Needs `generate_data_spouses` in W (it is run if missing).
"""
import argparse
import time
from pathlib import Path

import torch

from models import ensure_model, load_model, resolve_model
from twohop.training.batching import collate, length_grouped_batches, random_batches
from twohop.training.batching import encode_rows
from twohop.data.records import read_records

FILES = ["train/a_demoed", "train/b_demoed", "train/2hop_cot", "train/2hop_nocot", "train/samedoc_distractor"]


def run(model, examples, batches, steps, pad_id) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    real = padded = 0
    started = time.perf_counter()
    for indices in batches[:steps]:
        batch = collate([examples[i] for i in indices], pad_id)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        real += int(batch["attention_mask"].sum())
        padded += batch["input_ids"].numel()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "real_tokens_per_s": real / seconds, "padding_share": 1 - real / padded}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace_path", type=Path, required=True)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()
    data = args.workspace_path / "experiments/generate_data/spouses/data"
    if not data.is_dir():
        from runner.main import main as runner
        runner(["--workspace_path", str(args.workspace_path), "--jobs", "generate_data_spouses"])
    ref = resolve_model(args.model, args.workspace_path / "transformers")
    ensure_model(ref)
    torch.manual_seed(0)
    model, tokenizer = load_model(ref.path)
    model.train()
    rows = [row for name in FILES for row in read_records(data / f"{name}.jsonl")]
    examples = encode_rows(tokenizer, rows, {"max_length": 1024})
    lengths = [len(e["input_ids"]) for e in examples]
    results = {}
    for name, batches in (("random (pad to longest)", random_batches(len(examples), args.batch_size, 0, 0)),
                          ("length-grouped", length_grouped_batches(lengths, args.batch_size, 0, 0))):
        run(model, examples, batches[-3:], 3, tokenizer.pad_token_id)  # warm-up
        results[name] = run(model, examples, batches, args.steps, tokenizer.pad_token_id)
    print(f"{len(rows)} rows, {args.steps} steps of {args.batch_size}, model {ref.name}, "
          f"{torch.get_num_threads()} threads")
    for name, r in results.items():
        print(f"  {name:<24} {r['real_tokens_per_s']:>9.0f} real tokens/s   padding {r['padding_share']:.0%}")
    ratio = results["length-grouped"]["real_tokens_per_s"] / results["random (pad to longest)"]["real_tokens_per_s"]
    print(f"  ratio length-grouped / random: {ratio:.2f}x")


if __name__ == "__main__":
    main()
