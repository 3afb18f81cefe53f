"""Back-patching grid: ours (`twohop.interp.backpatching.grid_rows`: one cached clean pass per batch
of questions, the patched generations batched) vs. the straightforward loop (for each question and
each (source, target) pair, a full clean forward for the source state, then a patched forward and
greedy generation for that question alone: no batching, no reuse of the clean pass). Same model,
same questions, same pairs (patched at t2), one process; every reply must be identical.

    python bench/backpatch_grid.py --workspace_path W [--items 70] [--deep_items 4] [--layer_stride 1]
                                   [--max_new_tokens 16] [--batch_size 16] [--threads 2]

Two models: the tiny model `finetune_spouses` trained in W (seed 1; 2 layers, states 0..2: 3 pairs)
on the spouses two-hop no-CoT tests, and a random-init 12-layer Llama of hidden 256 with the tiny
tokenizer, built here and saved nowhere (states 0..12: 78 pairs), on the first `--deep_items` of
those questions: its replies are gibberish, but both arms must still give the same ones. Both arms
also produce each question's unpatched reply. W is only read.
"""
import argparse
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from models import load_model
from twohop.data.dataset import two_hop_tests
from twohop.evaluation import generation
from twohop.interp import backpatching
from twohop.interp.hooks import n_states

TINY = "experiments/finetune/spouses/tiny-h128-l2/seed_1/model"
DATA = "experiments/generate_data/spouses/data"


def deep_model(tiny, tokenizer, layers: int = 12, hidden: int = 256) -> LlamaForCausalLM:
    """A random-init Llama with the tiny model's tokenizer and special tokens, deeper and wider."""
    config = LlamaConfig(vocab_size=tiny.config.vocab_size, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=tiny.config.max_position_embeddings, tie_word_embeddings=True,
                         bos_token_id=tiny.config.bos_token_id, eos_token_id=tiny.config.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = tiny.generation_config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# --- The straightforward loop: plain hooks on the HF decoder layers, one question, one pair at a time.

def _hidden(value):
    """A decoder layer's output or input: a tensor (transformers 5) or a tuple led by the hidden states."""
    return value[0] if isinstance(value, tuple) else value


def _with_hidden(value, hidden):
    return (hidden, *value[1:]) if isinstance(value, tuple) else hidden


def _patch_hook(target: int, layers, position: int, vector: torch.Tensor, prompt_length: int):
    """Register a hook writing `vector` into state `target` at `position`, on the prompt pass only."""
    def replace(hidden):
        if hidden.shape[1] != prompt_length:  # a decoding step: leave it alone
            return None
        hidden = hidden.clone()
        hidden[0, position] = vector
        return hidden

    if target == 0:  # the embeddings: what enters the first decoder layer
        def pre_hook(_module, args, kwargs):
            if args:
                new = replace(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = replace(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})
        return layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(_module, _args, output):
        new = replace(_hidden(output))
        return None if new is None else _with_hidden(output, new)
    return layers[target - 1].register_forward_hook(hook)


@torch.no_grad()
def naive_reply(model, tokenizer, query, pair, max_new_tokens: int, stop: list) -> str:
    """One question's greedy reply with decoder state `source`'s t2 vector written into state `target`."""
    ids = torch.tensor([query.ids])
    t2, layers, handle = query.positions["t2"], model.model.layers, None
    if pair is not None:
        source, target = pair
        kept = {}
        read = layers[source - 1].register_forward_hook(
            lambda _m, _a, output: kept.__setitem__("vector", _hidden(output)[0, t2].clone()))
        try:
            model(input_ids=ids)  # the clean pass, redone for every pair
        finally:
            read.remove()
        handle = _patch_hook(target, layers, t2, kept["vector"], ids.shape[1])
    try:
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
    finally:
        if handle is not None:
            handle.remove()
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip()


def naive_grid(model, tokenizer, queries: list, pairs: list, max_new_tokens: int) -> dict:
    """{(item, source, target): reply}, the unpatched reply under (item, None, None)."""
    stop = generation.stop_token_ids(model, tokenizer)
    return {(q.id, *(pair or (None, None))): naive_reply(model, tokenizer, q, pair, max_new_tokens, stop)
            for q in queries for pair in [None] + pairs}


# --- Ours, and the comparison.

def our_grid(model, tokenizer, queries: list, pairs: list, max_new_tokens: int, batch_size: int) -> dict:
    chunks = backpatching.grid_rows(model, tokenizer, queries, pairs, ["t2"], batch_size, max_new_tokens)
    rows = [row for chunk in chunks for row in chunk]
    return {(r["item"], r["source"], r["target"]): r["reply"] for r in rows}


def timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def changed(replies: dict) -> int:
    """Patched replies that differ from their question's unpatched one: the patch does something."""
    return sum(reply != replies[(item, None, None)]
               for (item, source, _), reply in replies.items() if source is not None)


def compare(name: str, model, tokenizer, queries: list, args) -> tuple:
    """Time both arms (after a warm-up of one question and one pair each), print two table rows;
    return (mismatched replies, patched replies that differ from the unpatched one)."""
    pairs = backpatching.layer_pairs(n_states(model), args.layer_stride)
    arms = {"straightforward loop": lambda qs, ps: naive_grid(model, tokenizer, qs, ps, args.max_new_tokens),
            "ours (grid_rows)": lambda qs, ps: our_grid(model, tokenizer, qs, ps, args.max_new_tokens, args.batch_size)}
    replies, seconds = {}, {}
    for arm, run in arms.items():
        run(queries[:1], pairs[:1])
        replies[arm], seconds[arm] = timed(lambda: run(queries, pairs))
    naive, ours = replies.values()
    assert naive.keys() == ours.keys(), "the arms covered different (question, pair) cells"
    mismatches = sum(naive[key] != ours[key] for key in naive)
    patched = len(queries) * len(pairs)
    slow = seconds["straightforward loop"]
    for arm, s in seconds.items():
        print(f"| {name} | {arm} | {len(pairs)} | {len(queries)} | {s:.1f} | {patched / s:,.1f} | "
              f"{'**' if arm.startswith('ours') else ''}{slow / s:.1f}x{'**' if arm.startswith('ours') else ''} "
              f"| {len(naive) - mismatches}/{len(naive)} |", flush=True)
    return mismatches, changed(ours)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace_path", type=Path, required=True)
    parser.add_argument("--items", type=int, default=70, help="questions for the tiny model (0: all)")
    parser.add_argument("--deep_items", type=int, default=4, help="questions for the 12-layer random-init model")
    parser.add_argument("--layer_stride", type=int, default=1, help="every n-th state as source and target")
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=16, 
                        help="ours: questions per clean pass, rows per generation")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_path, data = args.workspace_path / TINY, args.workspace_path / DATA
    if not model_path.is_dir() or not data.is_dir():
        raise SystemExit(f"need {model_path} and {data}: run `python runner/main.py --workspace_path "
                         f"{args.workspace_path} --jobs finetune_spouses` first")
    tiny, tokenizer = load_model(model_path)
    queries = backpatching.queries(tokenizer, two_hop_tests(data))
    print(f"{torch.get_num_threads()} threads, {args.max_new_tokens} new tokens max, patched at t2, "
          f"layer stride {args.layer_stride}, batch size {args.batch_size}\n")
    print("| model | arm | pairs | questions | seconds | patched generations/s | speed-up | identical replies |\n"
          "|---|---|---|---|---|---|---|---|")
    results = [compare("tiny h128/L2, fine-tuned", tiny, tokenizer, queries[:args.items or None], args),
               compare("random-init h256/L12", deep_model(tiny, tokenizer), tokenizer, queries[:args.deep_items], args)]
    mismatches = sum(m for m, _ in results)
    print(f"\nmismatched replies: {mismatches}; patched replies that differ from their unpatched reply "
          f"(the patch does something): {', '.join(str(c) for _, c in results)} (tiny, random-init)")
    assert mismatches == 0, "the two arms gave different replies: the timings compare different computations"


if __name__ == "__main__":
    main()
