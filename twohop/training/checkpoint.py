"""Training checkpoints in safetensors + JSON (no pickles): weights, optimizer, scheduler, RNG, data position,
and what the training log carries over (so a resumed run logs exactly what an uninterrupted one does)."""
import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from runner.files import atomic_directory


def save_checkpoint(directory: Path, model, tokenizer, optimizer, scheduler, position: dict, logged: dict) -> None:
    """`scheduler` may be None (a constant rate, as in the drills)."""
    state = optimizer.state_dict()
    tensors = {"rng.torch": torch.get_rng_state()}
    plain_state = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain_state.setdefault(str(index), {})[key] = value
    trainer_state = {"position": position, "logged": logged, "param_groups": state["param_groups"],
                     "optimizer_plain": plain_state,
                     "scheduler": scheduler.state_dict() if scheduler is not None else None,
                     "rng_python": random.getstate()}
    with atomic_directory(directory) as staging:
        model.save_pretrained(staging / "model", safe_serialization=True)
        tokenizer.save_pretrained(staging / "model")
        save_file(tensors, str(staging / "optimizer.safetensors"))
        (staging / "trainer_state.json").write_text(json.dumps(trainer_state, default=list))


def latest_checkpoint(checkpoints: Path):
    """The newest checkpoint this trainer can resume exactly (one from before the log's state was saved
    is passed over, so that run restarts instead of logging differently)."""
    found = sorted(checkpoints.glob("step_*"), key=lambda p: int(p.name.split("_")[1])) if checkpoints.is_dir() else []
    complete = [p for p in found if _resumable(p / "trainer_state.json")]
    return complete[-1] if complete else None


def _resumable(state_file: Path) -> bool:
    return state_file.is_file() and "logged" in json.loads(state_file.read_text())


def load_checkpoint(directory: Path, optimizer, scheduler) -> tuple:
    """Restore optimizer, scheduler and RNG from `directory`; returns the data position and the log's state."""
    trainer_state = json.loads((directory / "trainer_state.json").read_text())
    tensors = load_file(str(directory / "optimizer.safetensors"))
    state = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, plain in trainer_state["optimizer_plain"].items():
        state.setdefault(int(index), {}).update(plain)
    optimizer.load_state_dict({"state": state, "param_groups": trainer_state["param_groups"]})
    if scheduler is not None:
        scheduler.load_state_dict(trainer_state["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    random.setstate(as_random_state(trainer_state["rng_python"]))
    return trainer_state["position"], trainer_state["logged"]


def as_random_state(saved: list) -> tuple:
    """A `random.Random` state back from its JSON form (lists for tuples)."""
    version, internal, gauss = saved
    return version, tuple(internal), gauss


def prune_checkpoints(checkpoints: Path, keep: int = 1) -> None:
    found = sorted(checkpoints.glob("step_*"), key=lambda p: int(p.name.split("_")[1])) if checkpoints.is_dir() else []
    for old in found[:-keep] if keep else found:
        shutil.rmtree(old, ignore_errors=True)
