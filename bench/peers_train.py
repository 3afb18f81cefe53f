"""Training speed: our trainer vs. Hugging Face `Trainer` and TRL `SFTTrainer`, in one run.

Same starting model, same rows, the same completion-only loss (the assistant reply and its
end-of-turn token, under the model's chat template), batch size, optimizer (AdamW, constant
learning rate, no warm-up, clipping 1.0), steps and seed, float32 on CPU. Each arm runs in its own
process (`--arm`). Reported per arm: wall seconds from the rows to the trained model (loading and
encoding included: ours is the whole `train()` call, a peer's is building its trainer and `train()`)
and of the training loop alone (ours: the trainer's own `train_seconds`, from the first step to the
saved model; a peer's: `train()`), real (non-pad) tokens per second of the loop over the rows its
batches held, and the mean reply loss of the trained model on a fixed 512 training rows, computed
the same way for every arm (so "equal loss" is one number).

The peers run with their defaults (random batches padded to the longest row) and, as a second row
each, with their own length grouping (`train_sampling_strategy="group_by_length"`, transformers'
`LengthGroupedSampler`; TRL's `padding_free` needs flash attention, so SFTTrainer gets the same
sampler), so the comparison is not only against padding.

Usage (the peers are not in requirements.txt: `pip install trl==1.16.0`):

    python bench/peers_train.py --workspace_path W [--steps 200] [--batch_size 32]

The model defaults to W's `finetune_base` (the tiny default, h128/L2); rows are W's spouses
training files (what `finetune_spouses` trains on).
"""
import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARMS = ("ours", "trainer", "trainer_grouped", "sft", "sft_grouped")


def training_rows(workspace: Path, count: int) -> list:
    from twohop.data.records import read_records
    files = sorted((workspace / "experiments/generate_data/spouses/data/train").glob("*.jsonl"))
    rows = [row for f in files for row in read_records(f)]
    if not rows:
        raise SystemExit(f"no training rows under {workspace}/experiments/generate_data/spouses/data/train; "
                         f"run `python runner/main.py --workspace_path {workspace} --jobs generate_data_spouses`")
    import random
    random.Random(0).shuffle(rows)
    return rows[:count]


class CountingCollator:
    """The peers' collator, counting the real tokens of every batch it builds."""

    def __init__(self, collate):
        self.collate, self.tokens = collate, 0

    def __call__(self, features):
        batch = self.collate(features)
        self.tokens += int(batch["attention_mask"].sum())
        return batch


def hf_arguments(args, out: Path, grouped: bool, cls):
    return cls(output_dir=str(out), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
               learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
               max_grad_norm=1.0, seed=0, logging_steps=50, save_strategy="no", report_to=[], use_cpu=True,
               train_sampling_strategy="group_by_length" if grouped else "random", dataloader_num_workers=0, disable_tqdm=True,
               bf16=False, gradient_checkpointing=False)  # float32 and no recomputation in every arm (SFTConfig
    # defaults both to True: bf16 autocast on a CPU without bf16 units made TRL's arm ~10x slower here)


def run_trainer(args, model_path: Path, rows: list, out: Path, grouped: bool):
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments
    from datasets import Dataset
    from models import load_model
    from twohop.training.batching import encode_chat
    model, tokenizer = load_model(model_path)
    encoded = [encode_chat(tokenizer, row["messages"], 512) for row in rows]
    dataset = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"],
                                  "attention_mask": [1] * len(e["input_ids"])} for e in encoded])
    collator = CountingCollator(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    trainer = Trainer(model=model, args=hf_arguments(args, out, grouped, TrainingArguments), train_dataset=dataset,
                      data_collator=collator)
    return trainer, collator, model, tokenizer


def run_sft(args, model_path: Path, rows: list, out: Path, grouped: bool):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from models import load_model
    model, tokenizer = load_model(model_path)
    dataset = Dataset.from_list([{"prompt": row["messages"][:-1], "completion": row["messages"][-1:]} for row in rows])
    config = hf_arguments(args, out, grouped, SFTConfig)
    config.completion_only_loss, config.max_length, config.packing = True, 512, False
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.data_collator = collator = CountingCollator(trainer.data_collator)  # TRL's own, counted
    return trainer, collator, model, tokenizer


def run_ours(args, model_path: Path, rows: list, out: Path) -> dict:
    from runner.config import defaults
    from twohop.training.config import TrainingConfig
    from twohop.training.trainer import train
    config = {**defaults(TrainingConfig), "lr": args.lr, "lr_scheduler": "constant", "warmup_ratio": 0.0,
              "max_steps": args.steps, "epochs": 1000, "batch_size": args.batch_size, "save_every_steps": 0,
              "log_every_steps": 50, "bf16": False, "seed": 0}
    started = time.perf_counter()
    summary = train(config, model_path, rows, {}, out, logging.getLogger("bench"))
    return {"seconds": time.perf_counter() - started, "loop_seconds": summary["train_seconds"],
            "tokens": summary["tokens"], "model": out / "model"}


def held_out_loss(model_path_or_model, rows: list) -> float:
    """Mean reply-token loss (nats) over `rows`, the same function for every arm."""
    import torch
    from models import load_model
    from twohop.training.batching import encode_chat
    from twohop.training.losses import row_losses
    model, tokenizer = load_model(model_path_or_model)
    examples = [encode_chat(tokenizer, row["messages"], 512) for row in rows]
    losses, _ = row_losses(model, examples, tokenizer.pad_token_id, torch.device("cpu"))
    return float(sum(losses) / len(losses))


def arm(name: str, args) -> dict:
    rows = training_rows(args.workspace_path, args.rows)
    model_path = args.model_path or args.workspace_path / "experiments/finetune/base/tiny-h128-l2/model"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if name == "ours":
            result = run_ours(args, model_path, rows, out)
            trained = result["model"]
        else:
            build = run_trainer if name.startswith("trainer") else run_sft
            started = time.perf_counter()
            trainer, collator, model, tokenizer = build(args, model_path, rows, out, name.endswith("grouped"))
            loop_started = time.perf_counter()
            trainer.train()
            loop_seconds = time.perf_counter() - loop_started
            result = {"seconds": time.perf_counter() - started, "loop_seconds": loop_seconds, "tokens": collator.tokens}
            trained = out / "model"
            model.save_pretrained(trained)
            tokenizer.save_pretrained(trained)
        loss = held_out_loss(trained, rows[:512])
    return {"arm": name, "seconds": result["seconds"], "loop_seconds": result["loop_seconds"], "tokens": result["tokens"],
            "tokens_per_s": result["tokens"] / result["loop_seconds"], "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace_path", type=Path, required=True)
    parser.add_argument("--model_path", type=Path, help="default: W's finetune_base model (the tiny default)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rows", type=int, default=8000, help="training rows (shuffled, seeded)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(arm(args.arm, args)))
        return
    common = [a for a in sys.argv[1:] if a != "--arms" and a not in ARMS]
    print(f"| arm | seconds, all | seconds, training loop | real tokens | tokens/s (loop) | loss after ({args.steps} steps, "
          f"512 rows) |\n|---|---|---|---|---|---|")
    for name in args.arms:
        done = subprocess.run([sys.executable, __file__, *common, "--arm", name], capture_output=True, text=True)
        if done.returncode:
            print(f"| {name} | failed: {done.stderr.strip().splitlines()[-1]} |", flush=True)
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {r['arm']} | {r['seconds']:.1f} | {r['loop_seconds']:.1f} | {r['tokens']:,} | {r['tokens_per_s']:,.0f} | "
              f"{r['loss']:.4f} |",
              flush=True)


if __name__ == "__main__":
    main()
