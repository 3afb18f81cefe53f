"""Per-state directions in the residual stream, saved as safetensors: what `steer` computes and adds,
and what `probe` learns and hands to `steer`.

A directions file holds one float32 vector [hidden] per residual state, named `state_<i>` (0 =
embeddings, i = decoder layer i's output, as in `twohop.interp.hooks`), and string metadata: `kind`
(how they were made, e.g. "difference_of_means" or "probe"), `position` (the prompt position they
were read at) and `label` (what they separate, e.g. "correct - wrong"). Written atomically.
"""
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from runner.errors import UserError
from runner.files import atomic_write_bytes

PREFIX = "state_"


def save_directions(path: Path, directions: dict, kind: str, position: str, label: str) -> None:
    """Write {state: vector [hidden]} (any float dtype; stored float32) with their metadata."""
    tensors = {f"{PREFIX}{state}": vector.detach().to("cpu", torch.float32).contiguous()
               for state, vector in sorted(directions.items())}
    atomic_write_bytes(path, save(tensors, metadata={"kind": kind, "position": position, "label": label}))


def load_directions(path: Path) -> tuple:
    """({state: float32 vector}, metadata) of a directions file; one line naming the file if it is not one."""
    try:
        with safe_open(str(path), framework="pt") as reader:
            names, metadata = list(reader.keys()), reader.metadata() or {}
            directions = {int(name[len(PREFIX):]): reader.get_tensor(name) for name in names
                          if name.startswith(PREFIX) and name[len(PREFIX):].isdigit()}
    except (OSError, ValueError, RuntimeError) as error:
        raise UserError(f"{path}: not a readable directions file ({str(error).splitlines()[0]})") from None
    if not directions or len(directions) != len(names):
        raise UserError(f"{path}: a directions file holds only tensors named {PREFIX}<state>; found {names[:5]}")
    widths = {vector.shape for vector in directions.values()}
    if len(widths) != 1 or len(next(iter(widths))) != 1:
        raise UserError(f"{path}: every direction must be one vector of the same width; found shapes {sorted(widths)}")
    return directions, metadata
