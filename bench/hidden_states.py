"""Saving hidden states: the streaming saver vs. collecting everything in memory, at 1k and 10k rows.

Each (method, rows) arm runs in its own process, so its peak RSS is its own. The model is a
random-init Llama (default h512/L8, the tiny tokenizer), big enough that the states themselves
are visible against the process's baseline memory; prompts are "Tell me about <city> ..." turns.
Both arms save the last-token state of the embeddings and every layer, float32.

- baseline: per batch of 32 (sorted by length), `output_hidden_states=True`, keep the last
  token's states in a list; at the end stack them and write one safetensors file.
- streaming (ours): `twohop.interp.hidden_states.save_hidden_states`, shards of 512 rows.

Usage: python bench/hidden_states.py [--rows 1000 10000] [--hidden 512] [--layers 8]
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(hidden: int, layers: int, workdir: Path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from models import ensure_model, resolve_model
    tiny = resolve_model("tiny", workdir / "transformers")
    ensure_model(tiny)
    tokenizer = AutoTokenizer.from_pretrained(tiny.path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval(), tokenizer


def prompts(tokenizer, n: int) -> list:
    from twohop.evaluation import generation
    from twohop.data import tables
    cities = tables.cities()
    return [generation.prompt_text(tokenizer, [{"role": "user", "content": f"Tell me about {cities[i % len(cities)]}"
                                                + " and its history" * (i % 4)}]) for i in range(n)]


def baseline(model, tokenizer, texts, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    tokenizer.padding_side = "right"
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    kept = [None] * len(texts)
    with torch.no_grad():
        for start in range(0, len(order), 32):
            chunk = order[start:start + 32]
            batch = tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            hidden = model(**batch, output_hidden_states=True).hidden_states
            last = batch["attention_mask"].sum(1) - 1
            for b, i in enumerate(chunk):
                kept[i] = torch.stack([h[b, last[b]] for h in hidden])
    save_file({"last": torch.stack(kept, 1).contiguous()}, str(out / "states.safetensors"))


def arm(method: str, rows: int, hidden: int, layers: int) -> dict:
    """One measurement, in this process."""
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = build(hidden, layers, Path(tmp))
        texts = prompts(tokenizer, rows)
        loaded_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        if method == "baseline":
            baseline(model, tokenizer, texts, Path(tmp))
        else:
            from twohop.interp.hidden_states import save_hidden_states
            save_hidden_states(model, tokenizer, [{"id": i, "prompts": [t]} for i, t in enumerate(texts)], Path(tmp) / "s",
                               batch_size=32, shard_rows=512)
        seconds = time.perf_counter() - started
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, "rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
            "peak_rss_mb": peak_kb / 1024, "growth_mb": (peak_kb - loaded_kb) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--arm", nargs=2, metavar=("METHOD", "ROWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(arm(args.arm[0], int(args.arm[1]), args.hidden, args.layers)))
        return
    results = []
    for rows in args.rows:
        for method in ("baseline", "streaming"):
            out = subprocess.run([sys.executable, __file__, "--arm", method, str(rows), "--hidden", str(args.hidden),
                                  "--layers", str(args.layers)], capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"{r['method']:>9} {r['rows']:>6} rows: {r['rows_per_s']:8.1f} rows/s, peak RSS {r['peak_rss_mb']:7.0f} MB "
                  f"(+{r['growth_mb']:.0f} MB over the loaded model)", flush=True)
    state_mb = 4 * (args.layers + 1) * args.hidden / 2**20
    print(f"(states: {state_mb * 1000:.1f} MB per 1,000 rows)")


if __name__ == "__main__":
    main()
