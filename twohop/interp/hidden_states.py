"""Per-layer hidden states: capture, streaming save to safetensors shards, and a reader.

A states folder holds `metadata.json`, `shards/shard_<k>.safetensors` (one tensor per position
kind, each `[layers, rows, hidden]`, layer 0 = what enters decoder layer 1, layer i = decoder layer i's
output before the final norm), `shards/shard_<k>.jsonl` (those rows' sidecar) and, once complete,
`rows.jsonl` (every row, in input order). A row may carry several prompts; its stored state is
their mean (e.g. a relation shown by ten different few-shot prompts).

Shards are written as they fill, so memory stays flat however many rows there are; a shard's
safetensors file is written last and atomically, so a killed run resumes after its last complete
shard. `HiddenStates(folder).layer(i, where=...)` reads one layer of only the rows asked for,
opening only the shards that hold them.
"""
import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from models.families import decoder_layers
from runner.errors import UserError
from runner.files import atomic_open, atomic_write_bytes, atomic_write_json, atomic_write_jsonl, fingerprint, read_json
from twohop.interp.hooks import read_states

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def token_positions(tokenizer, text: str, span: str = "") -> tuple:
    """(input ids, {"last": last token, "span": last token of the span's last mention})."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=bool(span))
    ids = encoded["input_ids"]
    positions = {"last": len(ids) - 1}
    if span:
        start = text.rfind(span)
        if start < 0:
            raise UserError(f"span {span!r} does not occur in the prompt {text[:120]!r}")
        end = start + len(span)
        positions["span"] = max(i for i, (s, e) in enumerate(encoded["offset_mapping"]) if s < end and e > start)
    return ids, positions


@contextmanager
def capture(model, wanted: dict):
    """While active, each forward pass fills `states[position kind]` with `[layers, batch, hidden]`,
    taken at `wanted[kind]` (a LongTensor of token indices, one per batch row) in every layer. Layers are
    the residual states of `hooks.read_states`: layer 0 is what enters decoder layer 1 (the token
    embeddings plus GPT-2's position embeddings, times Gemma's scale), not the embedding module's output."""
    states = {}
    with read_states(model) as found:
        def collect():
            outputs = [found[state] for state in sorted(found)]
            rows = torch.arange(outputs[0].shape[0])
            for kind, index in wanted.items():
                states[kind] = torch.stack([out[rows, index.to(out.device)].float().cpu() for out in outputs])
            found.clear()
        yield states, collect


@torch.no_grad()
def row_states(model, tokenizer, rows: list, positions, batch_size: int) -> dict:
    """{kind: float32 [layers, len(rows), hidden]}: each row's mean state over its prompts.

    Prompts of all the rows are run together, sorted by length (right padding: causal attention
    keeps padding out of every real token's state), and put back in row order.
    """
    if "span" in positions:
        missing = next((row for row in rows if not row.get("span")), None)
        if missing is not None:
            raise UserError(f"row {missing.get('id', missing.get('row'))!r} has no span; the 'span' position needs one "
                            "per row (or save positions=['last'] only)")
    prompts = [(r, *token_positions(tokenizer, text, row.get("span", "") if "span" in positions else ""))
               for r, row in enumerate(rows) for text in row["prompts"]]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i][1]))
    device = next(model.parameters()).device
    # The decoder stack without the unembedding: only states are kept, and the logits ([batch, seq, vocab],
    # 8 GiB in float32 for 32 rows of 512 tokens with a 128k vocabulary) would be thrown away.
    stack = model.base_model
    sums, counts = {}, torch.zeros(len(rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(order), batch_size):
        chunk = [prompts[i] for i in order[start:start + batch_size]]
        width = max(len(ids) for _, ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for b, (_, ids, _) in enumerate(chunk):
            input_ids[b, :len(ids)] = torch.tensor(ids)
            attention[b, :len(ids)] = 1
        wanted = {kind: torch.tensor([where[kind] for _, _, where in chunk]) for kind in positions}
        with capture(model, wanted) as (states, collect):
            stack(input_ids=input_ids.to(device), attention_mask=attention.to(device))
            collect()
        owners = torch.tensor([r for r, _, _ in chunk])
        for kind, batch_states in states.items():
            if kind not in sums:
                sums[kind] = torch.zeros(batch_states.shape[0], len(rows), batch_states.shape[2])
            sums[kind].index_add_(1, owners, batch_states)
        counts.index_add_(0, owners, torch.ones(len(chunk)))
    return {kind: total / counts[None, :, None] for kind, total in sums.items()}


def save_hidden_states(model, tokenizer, rows: list, out_dir, positions=("last",), batch_size: int = 32,
                       shard_rows: int = 512, dtype: str = "float32", metadata=None, progress=None) -> dict:
    """Save every row's states under `out_dir`, shard by shard, resuming after the last complete shard.

    rows: dicts with `prompts` (rendered texts; their states are averaged) and any sidecar fields
    (id, entity, attribute, label, ...); `span` (text in the prompt) is needed for the "span" position.
    """
    out_dir, shards = Path(out_dir), Path(out_dir) / "shards"
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if not rows:
        raise UserError(f"no rows to save hidden states for in {out_dir}")
    positions = list(positions)
    identity = fingerprint({"rows": rows, "positions": positions, "dtype": dtype, "shard_rows": shard_rows,
                            **(metadata or {})})
    previous = read_json(out_dir / "metadata.json") if (out_dir / "metadata.json").is_file() else None
    if previous and previous.get("fingerprint") != identity:  # other rows or settings: start over
        for stale in (*shards.glob("shard_*"), out_dir / "rows.jsonl"):
            stale.unlink()
    info = {**(metadata or {}), "fingerprint": identity, "positions": positions, "dtype": dtype, "rows": len(rows),
            "shard_rows": shard_rows, "shards": (len(rows) + shard_rows - 1) // shard_rows, "complete": False,
            "layers": len(decoder_layers(model)) + 1, "hidden_size": model.config.hidden_size,
            "layout": "[layers, rows, hidden]; layer 0 enters decoder layer 1, layer i = decoder layer i's output"}
    shards.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "metadata.json", info)
    for k, start in enumerate(range(0, len(rows), shard_rows)):
        path = shards / f"shard_{k:05d}.safetensors"
        if not path.is_file():
            part = [{**row, "row": start + i} for i, row in enumerate(rows[start:start + shard_rows])]
            states = row_states(model, tokenizer, part, positions, batch_size)
            atomic_write_jsonl(shards / f"shard_{k:05d}.jsonl", [sidecar(r) for r in part])
            atomic_write_bytes(path, save({kind: s.to(DTYPES[dtype]).contiguous() for kind, s in states.items()},
                                          metadata={"first_row": str(start), "rows": str(len(part))}))
        if progress:
            progress(min(start + shard_rows, len(rows)), len(rows))
    with atomic_open(out_dir / "rows.jsonl") as f:
        for k in range(info["shards"]):
            f.write((shards / f"shard_{k:05d}.jsonl").read_text(encoding="utf-8"))
    atomic_write_json(out_dir / "metadata.json", {**info, "complete": True})
    return {**info, "complete": True}


def sidecar(row: dict) -> dict:
    """What rows.jsonl keeps of a row: its fields, with the first prompt instead of all of them."""
    out = {k: v for k, v in row.items() if k != "prompts"}
    out["prompt"], out["n_prompts"] = row["prompts"][0], len(row["prompts"])
    return out


class HiddenStates:
    """Read a states folder: `rows`, and `layer(i, position, where)` -> float32 `[rows, hidden]`
    in the order `select(where)` gives."""

    def __init__(self, folder):
        self.folder = Path(folder)
        meta = self.folder / "metadata.json"
        if not meta.is_file():
            raise UserError(f"{self.folder} holds no hidden states (no metadata.json)")
        self.metadata = read_json(meta)
        if not self.metadata.get("complete"):
            raise UserError(f"{self.folder}: the hidden states are incomplete; rerun the job to finish them")
        self.rows = [json.loads(line) for line in (self.folder / "rows.jsonl").read_text(encoding="utf-8").splitlines()]

    def select(self, where=None) -> list:
        """Indices of the rows matching `where`: a dict of field values, a function of the row, or
        a list of row indices (kept in its order)."""
        if where is None:
            return list(range(len(self.rows)))
        if isinstance(where, (list, tuple)):
            return list(where)
        test = where if callable(where) else lambda row: all(row.get(k) == v for k, v in where.items())
        return [i for i, row in enumerate(self.rows) if test(row)]

    def layer(self, layer: int, position: str = "last", where=None) -> np.ndarray:
        n_layers = self.metadata["layers"]
        if not -n_layers <= layer < n_layers:
            raise UserError(f"layer {layer}: {self.folder} has layers 0..{n_layers - 1}")
        if position not in self.metadata["positions"]:
            raise UserError(f"position {position!r}: {self.folder} has {self.metadata['positions']}")
        wanted = self.select(where)
        size = self.metadata["shard_rows"]
        out = np.empty((len(wanted), self.metadata["hidden_size"]), dtype=np.float32)
        by_shard = {}
        for n, index in enumerate(wanted):
            by_shard.setdefault(index // size, []).append((n, index % size))
        for shard, members in by_shard.items():
            with safe_open(self.folder / "shards" / f"shard_{shard:05d}.safetensors", framework="pt") as f:
                block = f.get_slice(position)[layer % n_layers:layer % n_layers + 1][0].float().numpy()  # this layer only
            for n, local in members:
                out[n] = block[local]
        return out
