"""Training on skill drills (`twohop.data.drills`): the tiny model's optional warm-up before its base corpus.

A plain PyTorch loop, as in the drills' probe (`bench/induction_probe.py`): full next-token loss,
AdamW at a constant rate, clipping at 1.0, one batch of one kind a step. Phases run in order
(`KIND[+KIND...]:STEPS`, a mixed phase taking its kinds in turn). Every `every` steps it reports the
step's target loss and accuracy (the second copy, or each looked-up value's first token) and, for a
mixed phase's kinds and any watched kind, the same on a held-out batch drawn from a stream of its own,
so scoring never changes the training rows.
"""
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from runner.errors import UserError
from runner.files import atomic_directory, atomic_write_jsonl, resume_jsonl
from twohop.training.checkpoint import (as_random_state, latest_checkpoint, load_checkpoint, prune_checkpoints,
                                       save_checkpoint)
from twohop.data.drills import COPY_KINDS, FACTS_PER_ROW, KEY_VALUE_KINDS, TWO_HOP_KINDS, drill_rows, word_pools
from twohop.training.batching import pack_apart

KINDS = (*COPY_KINDS, *KEY_VALUE_KINDS, *TWO_HOP_KINDS)


@dataclass(frozen=True)
class DrillSettings:
    batch_size: int = 32  # rows a step
    lr: float = 1e-3  # the induction head forms at 1e-3 and not at 3e-3 (bench/README.md)
    min_list_length: int = 12  # copy lists vary in length, so copying is not a fixed offset
    max_list_length: int = 36
    questions: int = 1  # questions per inline key-value row (the study asks one)
    every: int = 50  # steps between reports
    checkpoint_every: int = 200  # steps between the checkpoints a killed warm-up resumes from


def parse_kinds(text: str, what: str) -> tuple:
    kinds = tuple(text.split("+"))
    for kind in kinds:
        if kind not in KINDS:
            raise UserError(f"{what}: {kind!r} is not a drill; drills are {', '.join(KINDS)}")
    return kinds


def parse_phases(phases: list, what: str = "drill_phases", count: str = "STEPS") -> list:
    """["KIND[+KIND...]:STEPS", ...] -> [(kinds, steps), ...], or one line naming the bad entry."""
    parsed = []
    for text in phases:
        kinds, _, steps = text.partition(":")
        if not steps.isdigit() or int(steps) < 1:
            raise UserError(f"{what}: {text!r} is not KIND[+KIND...]:{count} with {count} a positive integer "
                            f"(e.g. random:{1000 if count == 'STEPS' else 2})")
        parsed.append((parse_kinds(kinds, what), int(steps)))
    return parsed


def phase_at(phases: list, step: int) -> tuple:
    """(the kinds of the phase `step` is in, the step's index in it); the step after the last (where the
    final report is made) counts as the last phase's."""
    for kinds, steps in phases:
        if step < steps:
            return kinds, step
        step -= steps
    return phases[-1][0], step


def forward(model, batch: dict, loss: bool = True):
    """The model's outputs (with its own next-token loss) on a batch from `pack_apart`, without a cache so
    that transformers sees where its rows start."""
    keys = ("input_ids", "position_ids", *(("labels",) if loss else ()))
    return model(**{key: batch[key].to(model.device) for key in keys}, use_cache=False)


def scores(logits, batch: dict) -> dict:
    """Mean loss and argmax accuracy on the target tokens."""
    targets = batch["targets"][:, 1:].to(logits.device)
    predicted, wanted = logits[:, :-1][targets], batch["input_ids"][:, 1:].to(logits.device)[targets]
    loss = torch.nn.functional.cross_entropy(predicted, wanted)
    return {"target_loss": round(loss.item(), 3),
            "target_accuracy": round((predicted.argmax(-1) == wanted).float().mean().item(), 3)}


class Drills:
    """The drill rows of one run: a training stream and a held-out stream, both seeded."""

    def __init__(self, tokenizer, settings: DrillSettings, seed: int):
        self.tokenizer, self.settings, self.pools = tokenizer, settings, word_pools(tokenizer)
        self.rng, self.held_out_rng = random.Random(seed), random.Random(f"held out {seed}")

    def batch(self, kind: str, held_out: bool = False) -> dict:
        s = self.settings
        rows = drill_rows(self.tokenizer, self.pools, kind, self.held_out_rng if held_out else self.rng,
                          s.batch_size, (s.min_list_length, s.max_list_length), s.questions)
        return pack_apart(rows, self.tokenizer.pad_token_id)

    def held_out_scores(self, model, kinds) -> dict:
        """Each kind's target loss and accuracy on a fresh batch, without a gradient."""
        with torch.no_grad():
            return {kind: scores(forward(model, batch, loss=False).logits, batch)
                    for kind in kinds for batch in [self.batch(kind, held_out=True)]}


def train_drills(model, tokenizer, phases: list, settings: DrillSettings, seed: int, report, watched=(),
                 checkpoints: Path = None, resume: Path = None) -> dict:
    """Train `model` in place on the drill `phases` ((kinds, steps) from `parse_phases`); `report(entry)`
    gets each report (step, kind, scores, seconds). With `checkpoints` (a folder), the weights, optimizer
    and row streams are saved there every `settings.checkpoint_every` steps; `resume` (one of those, whose
    weights `model` already holds) continues from it exactly as an uninterrupted run would. Returns the
    last report."""
    if not 1 <= settings.questions <= FACTS_PER_ROW:
        raise UserError(f"drill questions must be between 1 and {FACTS_PER_ROW}, got {settings.questions}")
    drills = Drills(tokenizer, settings, seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
    position = load_checkpoint(resume, optimizer, None)[0] if resume else {"step": 0, "seconds": 0}
    if resume:
        drills.rng.setstate(as_random_state(position["rows"]))
        drills.held_out_rng.setstate(as_random_state(position["held_out_rows"]))
    total_steps = sum(steps for _, steps in phases)
    started, last = time.time() - position["seconds"], None
    model.train()
    for step in range(position["step"], total_steps + 1):
        if checkpoints and position["step"] < step < total_steps and step % settings.checkpoint_every == 0:
            save_checkpoint(Path(checkpoints) / f"step_{step}", model, tokenizer, optimizer, None,
                            {"step": step, "seconds": time.time() - started, "rows": drills.rng.getstate(),
                             "held_out_rows": drills.held_out_rng.getstate()}, {})
            prune_checkpoints(Path(checkpoints))
        kinds, index = phase_at(phases, step)
        batch = drills.batch(kinds[index % len(kinds)])
        outputs = forward(model, batch)  # the model's own next-token loss on every labelled token
        if step % settings.every == 0:
            last = {"step": step, "data": kinds[index % len(kinds)], **scores(outputs.logits, batch)}
            held_out = drills.held_out_scores(model, (*kinds, *watched) if len(kinds) > 1 else watched)
            if held_out:
                last["held_out"] = held_out
            report({**last, "seconds": round(time.time() - started)})
        if step == total_steps:
            break
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return last


def interleaved_drill(tokenizer, spec: str, seed: int):
    """For the trainer's `extra_loss`: from "KIND[+KIND...]:EVERY", the full next-token loss of one drill
    batch (its kinds in turn) on every EVERY-th step, None on the others, so a skill the drills formed
    keeps being trained while the base corpus is learned. A step's rows depend on (seed, step) alone, so
    a resumed run draws the rows an uninterrupted one would."""
    ((kinds, every),) = parse_phases([spec], "drill_interleave", "EVERY")
    drills = Drills(tokenizer, DrillSettings(), seed)

    def loss(model, step: int):
        if step % every:
            return None
        drills.rng = random.Random(f"interleaved {seed} {step}")
        return forward(model, drills.batch(kinds[step // every % len(kinds)])).loss
    return loss


def warm_up(model_path, phases: list, settings: DrillSettings, seed: int, out_dir, log) -> Path:
    """Train the model at `model_path` on the drill `phases` (["KIND[+KIND...]:STEPS", ...]) and save it
    (safetensors, with its tokenizer) to `out_dir`/model, each report written to `out_dir`/drills.jsonl as it
    is made. A finished warm-up (its model folder) is reused; a killed one resumes from its last checkpoint
    (`out_dir`/checkpoints, removed once the model is saved)."""
    from accelerate import PartialState
    from models import load_model
    out_dir = Path(out_dir)
    if (out_dir / "model").is_dir():
        log.info("drill warm-up already done: %s", out_dir / "model")
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # if a kill came between saving and removing
        return out_dir / "model"
    if PartialState().num_processes > 1:
        raise UserError("finetune_base's drill_phases train in one process only; launch one")
    checkpoint = latest_checkpoint(out_dir / "checkpoints")
    torch.manual_seed(seed)
    model, tokenizer = load_model(checkpoint / "model" if checkpoint else model_path, dtype=torch.float32)
    reports = []
    if checkpoint:
        step = int(checkpoint.name.split("_")[1])
        reports = [e for e in resume_jsonl(out_dir / "drills.jsonl") if e["step"] < step]
        log.info("resuming the drills at step %d from %s", step, checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)

    def report(entry: dict) -> None:
        reports.append(entry)
        atomic_write_jsonl(out_dir / "drills.jsonl", reports)
        log.info("drills step %d (%s): target loss %.3f, accuracy %.3f", entry["step"], entry["data"],
                 entry["target_loss"], entry["target_accuracy"])

    train_drills(model, tokenizer, parse_phases(phases), settings, seed, report,
                 checkpoints=out_dir / "checkpoints", resume=checkpoint)
    with atomic_directory(out_dir / "model") as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    return out_dir / "model"
