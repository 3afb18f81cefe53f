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

"Equal loss" over the run, not only at its end: with `--curve_every K` every arm runs a second
time and its model is scored on the same 512 rows (the same function) every K steps. Each arm's
seconds to a loss L are then the steps its curve needs to reach L times its seconds per step in the
first (unscored) run, whose data order and updates the second repeats (same seed); the second table
gives them for a ladder of losses, against the faster peer at each.

Usage (the peers are not in requirements.txt: `pip install trl==1.16.0`):

    python bench/peers_train.py --workspace_path W [--steps 200] [--batch_size 32] [--curve_every 10]

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


def probe_examples(tokenizer, rows: list) -> list:
    from twohop.training.batching import encode_chat
    return [encode_chat(tokenizer, row["messages"], 512) for row in rows[:512]]


def scoring_callback(every: int, examples: list, pad_id: int, curve: list):
    """A transformers TrainerCallback appending (step, loss on the 512 rows) to `curve` every `every` steps."""
    import torch
    from transformers import TrainerCallback
    from twohop.training.losses import evaluate_losses

    class Scoring(TrainerCallback):
        def on_step_end(self, arguments, state, control, model=None, **kwargs):
            if state.global_step % every == 0:
                curve.append((state.global_step, evaluate_losses(model, examples, pad_id, torch.device("cpu"))[0]["loss"]))
    return Scoring()


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
    """Our trainer; with --scored, its own evaluation of the 512 rows every curve_every steps is the curve."""
    from runner.config import defaults
    from twohop.training.config import TrainingConfig
    from twohop.training.trainer import train
    config = {**defaults(TrainingConfig), "lr": args.lr, "lr_scheduler": "constant", "warmup_ratio": 0.0,
              "max_steps": args.steps, "epochs": 1000, "batch_size": args.batch_size, "save_every_steps": 0,
              "log_every_steps": 50, "bf16": False, "seed": 0, "eval_every_steps": args.curve_every if args.scored else 0}
    started = time.perf_counter()
    summary = train(config, model_path, rows, {"probe": rows[:512]} if args.scored else {}, out, logging.getLogger("bench"))
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] if args.scored else []
    curve = [(e["step"], e["probe/loss"]) for e in entries if e.get("event") == "eval" and e["step"]]
    return {"seconds": time.perf_counter() - started, "loop_seconds": summary["train_seconds"],
            "tokens": summary["tokens"], "model": out / "model", "curve": curve}


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
            curve = []
            if args.scored:
                trainer.add_callback(scoring_callback(args.curve_every, probe_examples(tokenizer, rows),
                                                      tokenizer.pad_token_id, curve))
            loop_started = time.perf_counter()
            trainer.train()
            loop_seconds = time.perf_counter() - loop_started
            result = {"seconds": time.perf_counter() - started, "loop_seconds": loop_seconds, "tokens": collator.tokens,
                      "curve": curve}
            trained = out / "model"
            model.save_pretrained(trained)
            tokenizer.save_pretrained(trained)
        loss = held_out_loss(trained, rows[:512])
    return {"arm": name, "seconds": result["seconds"], "loop_seconds": result["loop_seconds"], "tokens": result["tokens"],
            "tokens_per_s": result["tokens"] / result["loop_seconds"], "loss": loss, "curve": result["curve"]}


def run_arm(name: str, common: list, *extra) -> dict:
    """One arm in its own process; its JSON, or {"arm", "failed"} with the error's last line."""
    done = subprocess.run([sys.executable, __file__, *common, "--arm", name, *extra], capture_output=True, text=True)
    if done.returncode:
        return {"arm": name, "failed": done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def steps_to(curve: list, loss: float):
    """The first scored step at which the curve is at or below `loss`, or None."""
    return next((step for step, value in curve if value <= loss), None)


def print_time_to_loss(speed: dict, curves: dict, losses: list, steps: int) -> None:
    """Seconds (and steps) each arm needs to reach each loss, and ours against the faster peer."""
    arms = [a for a in curves if a in speed and "failed" not in speed[a]]
    print(f"\n| loss on the 512 rows | {' | '.join(arms)} | faster peer / ours |\n|---|{'---|' * (len(arms) + 1)}")
    for loss in losses:
        seconds = {}
        for a in arms:
            at = steps_to(curves[a], loss)
            seconds[a] = None if at is None else (at * speed[a]["loop_seconds"] / steps, at)
        cells = ["not in %d steps" % steps if seconds[a] is None else "%.1f s (%d)" % seconds[a] for a in arms]
        peers = [seconds[a][0] for a in arms if a != "ours" and seconds[a]]
        ratio = ("%.2fx" % (min(peers) / seconds["ours"][0]) if peers and seconds.get("ours")
                 else "no peer reaches it" if seconds.get("ours") else "n/a")
        print(f"| {loss:g} | {' | '.join(cells)} | {ratio} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace_path", type=Path, required=True)
    parser.add_argument("--model_path", type=Path, help="default: W's finetune_base model (the tiny default)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rows", type=int, default=8000, help="training rows (shuffled, seeded)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--curve_every", type=int, default=0,
                        help="also run every arm scored every K steps and print seconds to each of --losses; 0: off")
    parser.add_argument("--losses", type=float, nargs="+", default=[1.5, 1.2, 1.0, 0.8, 0.6, 0.5],
                        help="the losses (nats, on the 512 rows) the time-to-loss table is given for")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--scored", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(arm(args.arm, args)))
        return
    common = [a for a in sys.argv[1:] if a != "--arms" and a not in ARMS]
    print(f"| arm | seconds, all | seconds, training loop | real tokens | tokens/s (loop) | loss after ({args.steps} steps, "
          f"512 rows) |\n|---|---|---|---|---|---|")
    speed = {}
    for name in args.arms:
        r = speed[name] = run_arm(name, common)
        if "failed" in r:
            print(f"| {name} | failed: {r['failed']} |", flush=True)
            continue
        print(f"| {r['arm']} | {r['seconds']:.1f} | {r['loop_seconds']:.1f} | {r['tokens']:,} | {r['tokens_per_s']:,.0f} | "
              f"{r['loss']:.4f} |", flush=True)
    if args.curve_every:
        curves = {name: run_arm(name, common, "--scored").get("curve", []) for name in args.arms}
        print_time_to_loss(speed, curves, args.losses, args.steps)


if __name__ == "__main__":
    main()
