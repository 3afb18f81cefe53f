"""One training step of the tiny model, by part: the stock loss vs. reply-token logits, and AdamW's
per-tensor loop (PyTorch's CPU default) vs. foreach vs. fused. Usage:

    python bench/train_step.py [--steps 300] [--batch_size 16]

A random-init embedded model (h128/L2, 4096-token vocabulary) on rows shaped like the spouses
training rows (26 tokens, the last 8 the reply). Each arm runs in its own process (one process's
allocator state skews the next arm), after 20 warm-up steps; the arms are interleaved over
`--rounds` rounds and the table gives each part's median.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from models import ensure_model, load_model, resolve_model
from twohop.training.losses import ReplyLoss


def time_steps(model, loss_of, optimizer, steps) -> dict:
    parts = dict.fromkeys(("forward", "backward", "clip", "optimizer"), 0.0)

    def step():
        marks = [time.perf_counter()]
        loss = loss_of()
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        marks.append(time.perf_counter())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        return [b - a for a, b in zip(marks, marks[1:])]

    for _ in range(20):
        step()
    for _ in range(steps):
        for key, seconds in zip(parts, step()):
            parts[key] += seconds
    return {key: 1000 * seconds / steps for key, seconds in parts.items()}


LOSSES = ("stock (logits everywhere)", "reply tokens only (ours)")
OPTIMIZERS = {"per-tensor (CPU default, ours)": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
ARMS = [(loss, opt) for loss in LOSSES for opt in OPTIMIZERS if not (loss.startswith("stock") and opt == "foreach")]


def run_arm(arm: int, steps: int, batch_size: int) -> dict:
    loss_name, opt_name = ARMS[arm]
    with tempfile.TemporaryDirectory() as tmp:
        ref = resolve_model("tiny", Path(tmp))
        ensure_model(ref)
        model, _ = load_model(ref.path, dtype=torch.float32)
    model.train()
    torch.manual_seed(0)
    ids = torch.randint(5, 4000, (batch_size, 26))
    labels = ids.clone()
    labels[:, :-8] = -100
    attention = torch.ones_like(ids)
    if loss_name.startswith("stock"):
        loss_of = lambda: model(input_ids=ids, attention_mask=attention, labels=labels).loss  # noqa: E731
    else:
        loss_of = lambda: ReplyLoss(model)(ids, attention, labels)[0]  # noqa: E731
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, **OPTIMIZERS[opt_name])
    return time_steps(model, loss_of, optimizer, steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--arm", type=int, help=argparse.SUPPRESS)  # internal: run one arm, print JSON
    args = parser.parse_args()
    if args.arm is not None:
        print(json.dumps(run_arm(args.arm, args.steps, args.batch_size)))
        return
    results = {arm: [] for arm in range(len(ARMS))}
    for _ in range(args.rounds):
        for arm in results:
            out = subprocess.run([sys.executable, __file__, "--arm", str(arm), "--steps", str(args.steps),
                                  "--batch_size", str(args.batch_size)], capture_output=True, text=True, check=True)
            results[arm].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| loss | AdamW | forward ms | backward ms | clip ms | optimizer ms | step ms |\n|---|---|---|---|---|---|---|")
    for arm, runs in results.items():
        parts = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        print(f"| {ARMS[arm][0]} | {ARMS[arm][1]} | " + " | ".join(f"{v:.1f}" for v in parts.values())
              + f" | **{statistics.median(sum(r.values()) for r in runs):.1f}** |")


if __name__ == "__main__":
    main()
