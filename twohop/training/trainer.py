"""The training loop: config-driven fine-tuning that runs alone or under `accelerate launch`.

Each rank trains on its own share of length-grouped batches; AdamW with warm-up and clipping;
evaluation at the start and every N steps (loss and teacher-forced accuracy per eval set, so the
shuffled-minus-true loss gap is tracked); metrics to metrics.jsonl; checkpoints that resume exactly.
`train(config, ...)` reads the keys of `twohop.training.config.TrainingConfig` plus `seed`, and those
of `AdapterTrainingConfig` when present: with `peft`, a LoRA adapter trains over the frozen base
(`twohop.training.lora`) and is what checkpoints and `model/` hold.
"""
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_scheduler

from models import load_model
from models.families import decoder_layers
from runner.errors import UserError
from runner.files import atomic_directory, atomic_write_text
from twohop.training import checkpoint, lora, memory
from twohop.training.batching import collate, encode_rows, length_grouped_batches, pack
from twohop.training.experiment import parse_layer_range
from twohop.stats import bootstrap_interval
from twohop.training.losses import ReplyLoss, auxiliary_loss, evaluate_losses, question_gaps

SCHEDULERS = {"linear": "linear", "constant": "constant_with_warmup", "cosine": "cosine"}


def freeze_outside(model, layers) -> None:
    """Train only the decoder layers in `layers` (a range); everything else is frozen."""
    if layers is None:
        return
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for index in layers:
        for parameter in decoder_layers(model)[index].parameters():
            parameter.requires_grad_(True)


class MetricsLog:
    """metrics.jsonl, appended line by line; on resume, the lines written after the checkpoint are dropped.

    The checkpoint keeps the count of lines written, not a step: an epoch's closing evaluation can be
    logged after a checkpoint at the same step, and would otherwise be logged twice."""

    def __init__(self, path: Path, kept_lines: int):
        self.path, self.lines = path, kept_lines
        text = path.read_text() if path.exists() and kept_lines else ""
        atomic_write_text(path, "".join(line + "\n" for line in text.splitlines()[:kept_lines]))

    def write(self, entry: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        self.lines += 1


def use_bf16(setting) -> bool:
    return setting is True or (setting == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported())


class Trainer:
    """One training run: set-up in __init__, then `run()` (steps, evals, checkpoints) and `finish()`."""

    def __init__(self, config: dict, model_path, train_rows, eval_sets: dict, run_dir: Path, log,
                 layers: str = "", loss_gaps: dict = None, extra_loss=None):
        self.config, self.run_dir, self.log, self.loss_gaps = config, run_dir, log, loss_gaps or {}
        self.extra_loss = extra_loss
        self.accelerator = Accelerator(mixed_precision="bf16" if use_bf16(config["bf16"]) else "no",
                                       cpu=not torch.cuda.is_available())
        torch.manual_seed(config["seed"])
        self.checkpoints = run_dir / "checkpoints"
        self.resume_from = checkpoint.latest_checkpoint(self.checkpoints)
        self.model_path = Path(model_path)
        self._load(layers)
        parameters = sum(p.numel() for p in self.model.parameters())
        if memory.use_checkpointing(config["gradient_checkpointing"], parameters, torch.cuda.is_available()):
            memory.enable_checkpointing(self.model)
        self.with_aux = bool(config["aux_loss_type"]) and config["aux_loss_coef"] > 0
        self._encode(train_rows, eval_sets)
        self._schedule()
        if extra_loss and self.world > 1:
            raise UserError("an extra loss (finetune_base's drill_interleave) trains in one process only; launch one")
        self._optimizer()
        self.reply_loss, self.optimizer = self.accelerator.prepare(ReplyLoss(self.model), self.optimizer)
        self.unwrapped = self.accelerator.unwrap_model(self.reply_loss).model
        main = self.accelerator.is_main_process
        self.metrics = MetricsLog(run_dir / "metrics.jsonl", self.logged["metrics_lines"]) if main else None
        self.wandb = _maybe_wandb(config, run_dir) if main else None

    def _load(self, layers: str) -> None:
        """The model to train: every parameter (those of `layers` only, if given), or a LoRA adapter over the
        frozen base (on `layers` only). `self.saved` is what checkpoints and model/ save: the model or the adapter."""
        checkpoint_model = self.resume_from / "model" if self.resume_from else None
        if lora.mode(self.config):
            base, self.tokenizer = lora.load_base(self.model_path, self.config, self.accelerator.device)
            layer_range = parse_layer_range(layers, len(decoder_layers(base)))
            self.saved = lora.attach(base, self.config, layer_range, checkpoint_model)
            self.model = self.saved.get_base_model()  # the transformers model, with peft's LoRA layers inside
        else:
            self.model, self.tokenizer = load_model(checkpoint_model or self.model_path, dtype=torch.float32)
            freeze_outside(self.model, parse_layer_range(layers, len(decoder_layers(self.model))))
            self.saved = self.model
        self.model.train()

    def _encode(self, train_rows, eval_sets) -> None:
        config = self.config
        if self.with_aux and config["packing"]:
            raise UserError("aux_loss_type needs packing off (the supervised position is per row)")
        self.examples = encode_rows(self.tokenizer, train_rows, config, self.with_aux)
        if self.with_aux and all(e["aux_position"] < 0 for e in self.examples):
            raise UserError(f"aux_loss_type={config['aux_loss_type']}: no training row has an auxiliary_loss_prefix "
                            "found in its prompt, so the auxiliary loss would never apply")
        if config["packing"]:
            self.examples = pack(self.examples, config["max_length"], random.Random(config["seed"]))
        self.eval_examples = {name: encode_rows(self.tokenizer, rows, config) for name, rows in eval_sets.items()}
        self.eval_questions = {name: [row.get("question", "") for row in rows] for name, rows in eval_sets.items()}
        self.lengths = [len(e["input_ids"]) for e in self.examples]

    def _schedule(self) -> None:
        config, accelerator = self.config, self.accelerator
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.batches_per_rank = len(length_grouped_batches(self.lengths, config["batch_size"], config["seed"], 0)) \
            // self.world
        self.accumulation = config["gradient_accumulation_steps"]
        self.steps_per_epoch = max(1, self.batches_per_rank // self.accumulation)
        self.total_steps = config["max_steps"] or self.steps_per_epoch * config["epochs"]
        if self.batches_per_rank < self.accumulation:
            raise UserError(f"{len(self.examples)} training rows make {self.batches_per_rank} batches per rank, fewer "
                            f"than gradient_accumulation_steps={self.accumulation}; lower batch_size or accumulation")

    def _optimizer(self) -> None:
        config = self.config
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in self.trainable if p.dim() >= 2]
        no_decay = [p for p in self.trainable if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config["weight_decay"]},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=config["lr"])
        self.scheduler = get_scheduler(SCHEDULERS[config["lr_scheduler"]], self.optimizer,
                                       num_warmup_steps=math.ceil(config["warmup_ratio"] * self.total_steps),
                                       num_training_steps=self.total_steps)
        self.position = {"step": 0, "epoch": 0, "micro": 0, "tokens": 0}
        # The losses since the last logged one and the lines logged: a resume continues both.
        self.logged = {"loss_window": [], "aux_window": [], "metrics_lines": 0}
        if self.resume_from:
            self.position, self.logged = checkpoint.load_checkpoint(self.resume_from, self.optimizer, self.scheduler)
            self.log.info("resuming from %s (step %d)", self.resume_from.name, self.position["step"])

    def evaluate(self, step: int) -> dict:
        """Loss and accuracy on every eval set (rank 0), with the shuffled-minus-true loss gaps."""
        if not self.accelerator.is_main_process:
            return {}
        results, losses = {}, {}
        for name, examples in self.eval_examples.items():
            results[name], losses[name] = evaluate_losses(self.unwrapped, examples, self.tokenizer.pad_token_id,
                                                          self.accelerator.device)
        entry = {"step": step, "event": "eval", **{f"{n}/{k}": v for n, r in results.items() for k, v in r.items()}}
        for shuffled, true in self.loss_gaps.items():
            entry[f"{true}/loss_gap"] = results[shuffled]["loss"] - results[true]["loss"]
            gaps = question_gaps(self.eval_questions[true], losses[true], self.eval_questions[shuffled], losses[shuffled])
            if gaps:  # per question, so the interval says whether the gap is more than noise
                entry[f"{true}/loss_gap_ci95"] = list(bootstrap_interval(gaps, 1000))
        self._log(entry, step)
        return entry

    def _log(self, entry: dict, step: int) -> None:
        self.metrics.write(entry)
        if self.wandb:
            self.wandb.log(entry, step=step)

    def _micro_step(self, indices) -> None:
        """Forward and backward of one batch (gradients accumulate until the optimizer steps)."""
        batch = collate([self.examples[i] for i in indices], self.tokenizer.pad_token_id)
        if self.with_aux:
            batch.update({k: torch.tensor([self.examples[i][k] for i in indices]) for k in ("aux_position", "aux_target")})
        batch = {k: v.to(self.accelerator.device) for k, v in batch.items()}
        lm_loss, hidden_states = self.reply_loss(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                                 output_hidden_states=self.with_aux)
        loss = lm_loss
        if self.with_aux:
            aux = auxiliary_loss(self.unwrapped, hidden_states, batch, self.config)
            loss = loss + self.config["aux_loss_coef"] * aux
            self.aux_window.append(aux.item())
        extra = self.extra_loss(self.unwrapped, self.position["step"]) if self.extra_loss else None
        if extra is not None:
            loss = loss + extra
        self.accelerator.backward(loss / self.accumulation)
        self.last_loss = lm_loss.item()
        self.loss_window.append(self.last_loss)
        self.position["tokens"] += int(batch["attention_mask"].sum()) * self.world

    def _optimizer_step(self, micro: int) -> None:
        if self.config["max_grad_norm"]:
            self.accelerator.clip_grad_norm_(self.trainable, self.config["max_grad_norm"])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.position["step"] += 1
        self.position["micro"] = micro + 1
        rate = (self.position["tokens"] - self.tokens_at_start) / max(time.time() - self.started, 1e-9)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{self.loss_window[-1]:.3f}", tok_s=f"{rate:.0f}", refresh=False)
        self._after_step(self.position["step"], rate)

    def _after_step(self, step: int, rate: float) -> None:
        """Log, evaluate and checkpoint as the config asks."""
        config = self.config
        if self.metrics and (step % config["log_every_steps"] == 0 or step == self.total_steps):
            aux = {"aux_loss": sum(self.aux_window) / len(self.aux_window)} if self.aux_window else {}
            self._log({"step": step, "event": "train", "loss": sum(self.loss_window) / len(self.loss_window),
                       "lr": self.scheduler.get_last_lr()[0], "epoch": self.position["epoch"],
                       "tokens": self.position["tokens"], "tokens_per_s": rate, **aux}, step)
            self.loss_window, self.aux_window = [], []
        if config["eval_every_steps"] and step % config["eval_every_steps"] == 0:
            self.evaluate(step)
            self.last_eval_step = step
        if config["save_every_steps"] and step % config["save_every_steps"] == 0 and step < self.total_steps:
            self.accelerator.wait_for_everyone()
            if self.accelerator.is_main_process:
                logged = {"loss_window": self.loss_window, "aux_window": self.aux_window,
                          "metrics_lines": self.metrics.lines}
                checkpoint.save_checkpoint(self.checkpoints / f"step_{step}", self.saved, self.tokenizer,
                                           self.optimizer, self.scheduler, dict(self.position), logged)
                checkpoint.prune_checkpoints(self.checkpoints, keep=1)

    def _record_epoch(self, epoch: int) -> list:
        """This rank's batches of `epoch`, its rows noted in the data-order record.

        They depend only on (lengths, batch size, seed, epoch, rank), so a resumed run recomputes
        the epochs before its checkpoint rather than keeping every rank's record in it."""
        batches = length_grouped_batches(self.lengths, self.config["batch_size"], self.config["seed"], epoch)
        mine = batches[self.rank::self.world][:self.batches_per_rank]
        self.rows_seen[epoch] = sorted({i for b in mine for i in b})
        return mine

    def _epoch(self) -> bool:
        """Train the rest of the current epoch; True once the last step is done."""
        position = self.position
        mine = self._record_epoch(position["epoch"])
        for micro in range(position["micro"], self.steps_per_epoch * self.accumulation):
            self._micro_step(mine[micro])
            if (micro + 1) % self.accumulation == 0:
                self._optimizer_step(micro)
                if position["step"] >= self.total_steps:
                    return True
        return False

    def run(self) -> dict:
        self.last_eval_step = self.position["step"] if self.resume_from else 0
        if self.position["step"] == 0:
            self.evaluate(0)
        self.bar = tqdm(total=self.total_steps, initial=self.position["step"], unit="step", dynamic_ncols=True,
                        disable=not self.accelerator.is_local_main_process, desc="train",
                        mininterval=1 if sys.stderr.isatty() else 30)
        self.started, self.tokens_at_start = time.time(), self.position["tokens"]
        self.loss_window, self.aux_window, self.last_loss = self.logged["loss_window"], self.logged["aux_window"], None
        self.rows_seen = {}  # epoch -> rows this rank trained on (a record of the data split across ranks)
        for epoch in range(self.position["epoch"]):  # the epochs before a resume
            self._record_epoch(epoch)
        done = self.position["step"] >= self.total_steps
        while not done:
            done = self._epoch()
            if not done:
                self.position.update(epoch=self.position["epoch"] + 1, micro=0)
                if not self.config["eval_every_steps"]:
                    self.evaluate(self.position["step"])
                    self.last_eval_step = self.position["step"]
        self.bar.close()
        final = self.evaluate(self.position["step"]) if self.last_eval_step != self.position["step"] else {}
        return self.finish(final)

    def finish(self, final: dict) -> dict:
        """Save the model or adapter (rank 0), drop checkpoints, record the data order; the run's figures."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.save(self.run_dir / "model")
            checkpoint.prune_checkpoints(self.checkpoints, keep=0)
        self.accelerator.wait_for_everyone()  # every rank may read model/ next (evaluation, the next stage)
        atomic_write_text(self.run_dir / f"data_order_rank{self.rank}.json",
                          json.dumps({"rank": self.rank, "world": self.world, "rows_by_epoch": self.rows_seen}))
        if self.wandb:
            self.wandb.finish()
        seconds = time.time() - self.started
        return {"steps": self.position["step"], "tokens": self.position["tokens"], "train_seconds": round(seconds, 2),
                "tokens_per_s": round((self.position["tokens"] - self.tokens_at_start) / max(seconds, 1e-9), 1),
                "final_train_loss": self.last_loss, "trainable_parameters": sum(p.numel() for p in self.trainable),
                **{k: v for k, v in final.items() if k != "event"}}

    def save(self, folder: Path) -> None:
        """The trained model, or the adapter with the base it was trained on named (and with merge=true, the merged
        model in model_merged/ beside it)."""
        with atomic_directory(folder) as staging:
            self.saved.save_pretrained(staging, safe_serialization=True)
            self.tokenizer.save_pretrained(staging)
            if lora.mode(self.config):
                lora.name_base(staging, folder, self.model_path)
        if lora.mode(self.config) and self.config["merge"]:
            lora.save_merged(folder, folder.parent / "model_merged", self.accelerator.device)


def train(config: dict, model_path, train_rows, eval_sets: dict, run_dir: Path, log, layers: str = "",
          loss_gaps: dict = None, extra_loss=None) -> dict:
    """Fine-tune the model at `model_path` on `train_rows`; save it (or the adapter) to `run_dir/model`.

    `layers` ('s-e', end-exclusive) trains (or, with peft, adapts) only those decoder layers; `loss_gaps` maps an
    eval set of shuffled answers to its true set, whose loss difference is logged as `<true>/loss_gap`;
    `extra_loss(model, step)`, when given, returns a loss added to the step's (or None): a single-process
    hook, used to keep a skill drill up during the tiny model's pretraining."""
    return Trainer(config, model_path, train_rows, eval_sets, run_dir, log, layers, loss_gaps, extra_loss).run()


def _maybe_wandb(config, run_dir):
    if not config["wandb"]:
        return None
    import wandb  # checked before the run: an enabled wandb that is not installed is refused
    wandb.init(project="twohop", dir=str(run_dir), config=config, name=run_dir.name)
    return wandb
