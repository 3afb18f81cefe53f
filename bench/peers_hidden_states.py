"""Hidden-state capture: ours vs. TransformerLens 4.x and nnsight, on the same prompts, layers and rows.

Every arm captures the same tensors: the last real token's state of the embeddings and of every
decoder layer's output (before the final norm), float32, `[layers + 1, rows, hidden]` in input
order, from the same random-init Llama (default h512/L8, the tiny tokenizer; built with seed 0 in
each process, as `bench/hidden_states.py` builds it) on the same "Tell me about <city> ..." chat
prompts, in batches of 32 rows sorted by length:

- ours: `twohop.interp.hidden_states.save_hidden_states` (right padding, forward hooks, shards of
  512 rows streamed to safetensors);
- transformer_lens: `TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=...)`
  wraps the already-built model (no hub access: the config comes from the model; the bridge
  switches its attention to eager in place, as it always does); per batch
  `run_with_cache(input_ids, attention_mask=..., names_filter=[embed.hook_out, blocks.i.hook_out])`
  with right padding, then each row's last real token is read from the cache;
- nnsight: `TransformersModel(model, tokenizer=..., task="text-generation")` (0.8's successor of
  the deprecated `LanguageModel`); per batch `model.trace(token ids)`, which left-pads with
  mask-derived position ids as nnsight does for decoders, saving `embed_tokens.output[:, -1]` and
  each `layers[i].output[:, -1]` (a transformers 5 decoder layer returns a tensor).

Neither peer has a way to stream states to disk, so their arms keep each batch's states as the
peer returns them and write one safetensors file at the end. Timed: wrapping the model (the
peers) and capturing and writing every row; not building the model or the prompts. Each
(arm, rows) runs in its own process (peak RSS is its own) with HF_HUB_OFFLINE=1; afterwards every
peer's states are checked against ours (max abs difference, must be <= 1e-5).

The default rows (1,000 and 5,000) keep a run near 5 minutes on a quiet 2-core machine;
`--rows 1000 10000` (the issue's sizes) takes about twice as long. `--threads 1` helps when other
work shares the CPUs (two torch threads per arm then crawl).

Usage (the peers are not in requirements.txt: `pip install transformer_lens==4.3.0 nnsight==0.8.1`):

    python bench/peers_hidden_states.py [--rows 1000 5000] [--arms ours transformer_lens nnsight]
                                        [--hidden 512] [--layers 8] [--threads N]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hidden_states import build, prompts  # noqa: E402  (the same model and prompts as that bench)

ARMS = ("ours", "transformer_lens", "nnsight")
TOLERANCE = 1e-5


def batches(tokenizer, texts: list, size: int = 32):
    """(input indices, token id lists) per batch of `size`, sorted by length as ours sorts them."""
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), size):
        chunk = order[start:start + size]
        yield chunk, [ids[i] for i in chunk]


def write_in_order(kept: list, order: list, path: Path) -> None:
    """Put per-batch `[layers, batch, hidden]` states back in input order; one safetensors file."""
    import torch
    from safetensors.torch import save_file
    states = torch.cat(kept, 1)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    save_file({"last": states[:, inverse].contiguous()}, str(path))


def transformer_lens_arm(model, tokenizer, texts: list, out: Path) -> None:
    import torch
    from transformer_lens.model_bridge import TransformerBridge
    bridge = TransformerBridge.boot_transformers("local-random-llama", hf_model=model, tokenizer=tokenizer,
                                                 device="cpu")
    names = ["embed.hook_out"] + [f"blocks.{i}.hook_out" for i in range(bridge.cfg.n_layers)]
    pad = tokenizer.pad_token_id
    kept, order = [], []
    with torch.no_grad():
        for chunk, ids in batches(tokenizer, texts):
            width = max(map(len, ids))
            input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in ids])
            mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
            _, cache = bridge.run_with_cache(input_ids, attention_mask=mask, names_filter=names)
            rows, last = torch.arange(len(ids)), mask.sum(1) - 1
            kept.append(torch.stack([cache[name][rows, last] for name in names]))  # indexing copies
            order += chunk
    write_in_order(kept, order, out / "states.safetensors")


def nnsight_arm(model, tokenizer, texts: list, out: Path) -> None:
    import nnsight
    import torch
    from nnsight.modeling.transformers import TransformersModel
    lm = TransformersModel(model, tokenizer=tokenizer, task="text-generation")  # left padding for decoders
    kept, order = [], []
    with torch.no_grad():
        for chunk, ids in batches(tokenizer, texts):
            with lm.trace(ids):
                saved = nnsight.save([lm.model.embed_tokens.output[:, -1]]
                                     + [layer.output[:, -1] for layer in lm.model.layers])
            kept.append(torch.stack(saved))
            order += chunk
    write_in_order(kept, order, out / "states.safetensors")


def arm(method: str, rows: int, hidden: int, layers: int, out: Path, threads: int) -> dict:
    """One measurement, in this process; the states go under `out`."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # TransformerLens reloads the tokenizer from its folder
        model, tokenizer = build(hidden, layers, Path(tmp))
        texts = prompts(tokenizer, rows)
        loaded_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        if method == "ours":
            from twohop.interp.hidden_states import save_hidden_states
            save_hidden_states(model, tokenizer, [{"id": i, "prompts": [t]} for i, t in enumerate(texts)],
                               out / "ours", batch_size=32, shard_rows=512)
        else:
            {"transformer_lens": transformer_lens_arm, "nnsight": nnsight_arm}[method](model, tokenizer, texts, out)
        seconds = time.perf_counter() - started
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, "rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
            "peak_rss_mb": peak_kb / 1024, "growth_mb": (peak_kb - loaded_kb) / 1024}


def max_difference(ours: Path, theirs: Path) -> float:
    """Largest |ours - theirs| over every layer and row."""
    import numpy as np
    from safetensors.numpy import load_file
    from twohop.interp.hidden_states import HiddenStates
    mine, other = HiddenStates(ours), load_file(str(theirs))["last"]
    return max(float(np.abs(mine.layer(i) - other[i]).max()) for i in range(other.shape[0]))


def run_arm(method: str, rows: int, args, out: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, __file__, "--arm", method, str(rows), "--hidden", str(args.hidden),
                           "--layers", str(args.layers), "--out", str(out),
                           "--threads", str(args.threads)], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"arm {method} ({rows} rows) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per arm (0: torch's default)")
    parser.add_argument("--arm", nargs=2, metavar=("METHOD", "ROWS"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(arm(args.arm[0], int(args.arm[1]), args.hidden, args.layers, args.out, args.threads)))
        return
    arms = ["ours"] + [a for a in args.arms if a != "ours"]  # ours is the reference for the values
    print("| rows | arm | rows/s | seconds | peak RSS MB | growth MB | max abs diff vs ours |\n"
          "|---|---|---|---|---|---|---|")
    failed = False
    for rows in args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            for method in arms:
                r = run_arm(method, rows, args, Path(tmp) / method)
                diff = "-"
                if method != "ours":
                    gap = max_difference(Path(tmp) / "ours" / "ours", Path(tmp) / method / "states.safetensors")
                    failed |= gap > TOLERANCE
                    diff = f"{gap:.1e}" + ("" if gap <= TOLERANCE else " (OVER 1e-5)")
                print(f"| {rows:,} | {method} | {r['rows_per_s']:.1f} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | "
                      f"+{r['growth_mb']:.0f} | {diff} |", flush=True)
    print(f"(states: {4 * (args.layers + 1) * args.hidden / 2**20 * 1000:.1f} MB per 1,000 rows; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end)")
    if failed:
        raise SystemExit(f"values differ from ours by more than {TOLERANCE}")


if __name__ == "__main__":
    main()
