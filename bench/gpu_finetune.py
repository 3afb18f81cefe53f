"""Fine-tuning throughput and peak memory on a GPU: random-init Llama-3.2-1B and Llama-3-8B shapes, bf16
autocast over fp32 master weights (as the trainer runs), full fine-tuning and LoRA, each with and without
gradient checkpointing. One command on a machine with a CUDA GPU:

    python bench/gpu_finetune.py [--shapes 1B 8B] [--batch_size 8] [--length 512] [--steps 10]

`--tiny` runs the same code on a tiny shape (on the CPU when there is no GPU) to test it. Each arm is a
fresh process (its own peak-memory counters; an out-of-memory arm does not poison the next): the
trainer's step (`ReplyLoss` with logits at the last 32 tokens of each row, accelerate's bf16 autocast,
AdamW, clipping, `zero_grad(set_to_none=True)`), 2 warm-up steps, then `--steps` timed ones. Printed per
arm: trainable parameters, tokens/s, peak GPU memory allocated and reserved by PyTorch (not measured on
the CPU) and `twohop.training.memory`'s estimate for the same shape.
LoRA: peft, rank 16 on every linear layer of the decoder (`target_modules="all-linear"`).
"""
import argparse
import json
import subprocess
import sys
import time

import torch

from twohop.training import memory
from twohop.training.losses import ReplyLoss

SHAPES = {  # the published configs' shapes
    "1B": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 8192, "vocab_size": 128256, "tie_word_embeddings": True},
    "8B": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128, "vocab_size": 1024, "tie_word_embeddings": True},
}
ARMS = [(method, checkpointing) for method in ("full", "lora") for checkpointing in (False, True)]
REPLY, LORA_RANK, WARMUP = 32, 16, 2


def build(shape: str, method: str, checkpointing: bool, device: str):
    """The random-init model (fp32 master weights) with LoRA adapters or not; the trainable parameters."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192)
    with torch.device(device):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).train()
    if checkpointing:
        memory.enable_checkpointing(model)
    if method == "lora":  # adapters are injected into `model`'s own modules; ReplyLoss keeps calling its parts
        from peft import LoraConfig, get_peft_model
        get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0,
                                         target_modules="all-linear"))
    return model, [p for p in model.parameters() if p.requires_grad]


def estimate(shape: str, trainable: list, args, checkpointing: bool, cuda: bool) -> int:
    from transformers import LlamaConfig
    model = memory.model_shape(LlamaConfig(**SHAPES[shape]))
    run = memory.TrainingShape(trainable=sum(p.numel() for p in trainable),
                               largest_trainable=max(p.numel() for p in trainable), batch=args.batch_size,
                               length=args.length, reply_tokens=args.batch_size * REPLY, bf16=True,
                               checkpointing=checkpointing, cuda=cuda)
    return memory.estimate_peak_memory(model, run).peak


def train_steps(model, trainable, args, device: str) -> float:
    """Warm up, then time `args.steps` steps; tokens per second."""
    from accelerate import Accelerator
    accelerator = Accelerator(mixed_precision="bf16", cpu=device == "cpu")
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    loss_of, optimizer = accelerator.prepare(ReplyLoss(model), optimizer)
    ids = torch.randint(8, model.config.vocab_size, (args.batch_size, args.length), device=device)
    labels = torch.full_like(ids, -100)
    labels[:, -REPLY:] = ids[:, -REPLY:]
    attention = torch.ones_like(ids)
    for step in range(WARMUP + args.steps):
        if step == WARMUP:
            synchronize(device)
            started = time.perf_counter()
        loss, _ = loss_of(ids, attention, labels)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return args.batch_size * args.length * args.steps / (time.perf_counter() - started)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_arm(shape: str, method: str, checkpointing: bool, args) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"shape": shape, "method": method, "checkpointing": checkpointing, "device": device,
              "free_gib": torch.cuda.mem_get_info()[0] / memory.GIB if device == "cuda" else None}
    try:
        model, trainable = build(shape, method, checkpointing, device)
        result.update(trainable=sum(p.numel() for p in trainable),
                      estimate_gib=estimate(shape, trainable, args, checkpointing, device == "cuda") / memory.GIB)
        result["tokens_per_s"] = train_steps(model, trainable, args, device)
        result["status"] = "ok"
    except torch.cuda.OutOfMemoryError:
        result["status"] = "out of memory"
    if device == "cuda":
        result.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / memory.GIB,
                      peak_reserved_gib=torch.cuda.max_memory_reserved() / memory.GIB)
    return result


def row(r: dict) -> str:
    def gib(key):
        return f"{r[key]:.2f}" if key in r else "n/a"

    cells = [r["shape"], r["method"], "on" if r["checkpointing"] else "off", f"{r.get('trainable', 0):,}",
             f"{r['tokens_per_s']:,.0f}" if r["status"] == "ok" else r["status"],
             gib("peak_allocated_gib"), gib("peak_reserved_gib"), gib("estimate_gib")]
    return "| " + " | ".join(cells) + " |"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["1B", "8B"], choices=["1B", "8B"])
    parser.add_argument("--tiny", action="store_true", help="the tiny shape only: tests the code path, on the CPU too")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--arm", nargs=3, help=argparse.SUPPRESS)  # internal: SHAPE METHOD CHECKPOINTING
    args = parser.parse_args()
    if args.arm:
        shape, method, checkpointing = args.arm
        print(json.dumps(run_arm(shape, method, checkpointing == "on", args)))
        return
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: run on a machine with one, or pass --tiny to test the code path on the CPU")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{device}, batch {args.batch_size} x {args.length} tokens, {args.steps} timed steps\n"
          "| shape | method | checkpointing | trainable | tokens/s | peak allocated GiB | peak reserved GiB "
          "| estimate GiB |\n|---|---|---|---|---|---|---|---|")
    for shape in ["tiny"] if args.tiny else args.shapes:
        for method, checkpointing in ARMS:
            command = [sys.executable, __file__, "--arm", shape, method, "on" if checkpointing else "off",
                       "--batch_size", str(args.batch_size), "--length", str(args.length), "--steps", str(args.steps)]
            out = subprocess.run(command, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"| {shape} | {method} | {'on' if checkpointing else 'off'} | failed: "
                      f"{(out.stderr.strip().splitlines() or ['?'])[-1]} |", flush=True)
                continue
            print(row(json.loads(out.stdout.strip().splitlines()[-1])), flush=True)


if __name__ == "__main__":
    main()
