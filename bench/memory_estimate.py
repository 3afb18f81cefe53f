"""Estimated vs. measured peak memory of training on CPU, for random-init Llama shapes of about 10M,
80M and 300M parameters (32k vocabulary, fp32 weights), with and without gradient checkpointing. Usage:

    python bench/memory_estimate.py [--sizes 10M 80M 300M] [--steps 4] [--bf16]

Each measurement is a fresh process: its peak resident memory (`VmHWM`) after `--steps` training
steps minus its peak just before the model is built (libraries imported, kernels warmed up). A step
is the trainer's: the reply-only loss (`ReplyLoss`, the last 16 tokens of each row are the reply),
AdamW over the trainer's two parameter groups, gradient clipping, `zero_grad(set_to_none=True)`; the
checkpointed arms call the trainer's `enable_checkpointing`; `--bf16` runs the forward pass under bf16
autocast, as the trainer does on a GPU (accelerate's `mixed_precision="bf16"`). Each arm runs twice:
with glibc's default allocator (what a run uses), against `twohop.training.memory.estimate_peak_memory`;
and with freed memory returned at once (`MALLOC_MMAP_THRESHOLD_=65536`: every tensor over 64 KiB is its
own mapping), which measures the live tensors, against the estimate without its allocator part.
`--measure SIZE` (internal) runs one measurement and prints it as JSON, with the estimates.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

from twohop.training import memory
from twohop.training.losses import ReplyLoss

VOCAB, REPLY = 32000, 16
LIVE = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # glibc: every allocation over 64 KiB mapped alone, unmapped when freed
SIZES = {  # Llama shapes (tied embeddings, as Llama-3.2-1B), each with a batch whose activations matter
    "10M": {"hidden": 256, "layers": 4, "heads": 4, "intermediate": 688, "batch": 8, "length": 128},
    "80M": {"hidden": 640, "layers": 12, "heads": 10, "intermediate": 1728, "batch": 8, "length": 256},
    "300M": {"hidden": 1024, "layers": 20, "heads": 16, "intermediate": 2816, "batch": 4, "length": 256},
}


def llama_config(size: str):
    from transformers import LlamaConfig
    shape = SIZES[size]
    return LlamaConfig(vocab_size=VOCAB, hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                       num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                       num_key_value_heads=shape["heads"], tie_word_embeddings=True, max_position_embeddings=1024)


def estimate(size: str, checkpointing: bool, bf16: bool) -> memory.MemoryEstimate:
    model = memory.model_shape(llama_config(size))
    batch, length = SIZES[size]["batch"], SIZES[size]["length"]
    run = memory.TrainingShape(trainable=model.parameters, largest_trainable=model.largest_tensor, batch=batch,
                               length=length, reply_tokens=batch * REPLY, bf16=bf16, checkpointing=checkpointing,
                               cuda=False)
    return memory.estimate_peak_memory(model, run)


def peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM, which starts afresh at exec. (`ru_maxrss` does not:
    a child started by a big process inherits its parent's peak, which hid the growth measured here.)"""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def measure(size: str, checkpointing: bool, bf16: bool, steps: int) -> dict:
    """Train `steps` steps in this process; the growth of its peak resident memory."""
    from transformers import LlamaForCausalLM
    batch, length = SIZES[size]["batch"], SIZES[size]["length"]
    torch.manual_seed(0)
    ids = torch.randint(8, VOCAB, (batch, length))
    labels = torch.full_like(ids, -100)
    labels[:, -REPLY:] = ids[:, -REPLY:]
    attention = torch.ones_like(ids)
    attention[: batch // 2, : length // 8] = 0  # some padding, as length-grouped batches have
    warm = torch.randn(2, 2, 8, 16, requires_grad=True)  # load the attention and autograd kernels first
    torch.nn.functional.scaled_dot_product_attention(warm, warm, warm).sum().backward()
    before = peak_rss()
    model = LlamaForCausalLM(llama_config(size)).train()
    if checkpointing:
        memory.enable_checkpointing(model)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.0}, {"params": vectors, "weight_decay": 0.0}],
                                  lr=1e-5)
    loss_of = ReplyLoss(model)
    started = time.time()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = loss_of(ids, attention, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    expected = estimate(size, checkpointing, bf16)
    return {"size": size, "checkpointing": checkpointing, "parameters": sum(p.numel() for p in model.parameters()),
            "measured": peak_rss() - before, "estimate": expected.peak,
            "estimate_tensors": expected.peak - expected.allocator,
            "seconds_per_step": round((time.time() - started) / steps, 2)}


def measured(size: str, checkpointing: bool, bf16: bool, steps: int, env: dict = None) -> dict:
    """`measure` in a fresh process (a process's peak resident memory only grows), with `env` added."""
    command = [sys.executable, __file__, "--measure", size, "--steps", str(steps)]
    command += (["--checkpointing"] if checkpointing else []) + (["--bf16"] if bf16 else [])
    out = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=4, help="training steps per measurement (the peak settles by 4)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast, as the trainer on a GPU")
    parser.add_argument("--measure", choices=list(SIZES), help=argparse.SUPPRESS)  # internal: one measurement
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.checkpointing, args.bf16, args.steps)))
        return
    print("| model | parameters | batch x length | checkpointing | estimate MiB | measured MiB | ratio "
          "| tensors estimate MiB | measured live MiB | ratio |\n|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for checkpointing in (False, True):
            r = measured(size, checkpointing, args.bf16, args.steps)
            live = measured(size, checkpointing, args.bf16, args.steps, LIVE)
            print(f"| {size} | {r['parameters'] / 1e6:.1f}M | {SIZES[size]['batch']} x {SIZES[size]['length']} | "
                  f"{'on' if checkpointing else 'off'} | {mib(r['estimate'])} | {mib(r['measured'])} | "
                  f"{r['estimate'] / r['measured']:.2f} | {mib(r['estimate_tensors'])} | {mib(live['measured'])} | "
                  f"{r['estimate_tensors'] / live['measured']:.2f} |", flush=True)


def mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.0f}"


if __name__ == "__main__":
    main()
