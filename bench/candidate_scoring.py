"""Candidate-set scoring: each (prompt, candidate) pair as its own sequence (the straightforward way)
vs. `runner.generation.score_candidates` (each prompt once, its candidates packed behind a block
mask). Same model, same prompts, one process; prints questions/s and the largest score difference.

    python bench/candidate_scoring.py --workspace_path W [--questions 200] [--model_dir DIR]

W needs `generate_data_spouses` (run if missing); the model is the tiny one `finetune_spouses`
trained in W if present, else a fresh random-init tiny model.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from models import ensure_model, load_model, resolve_model
from twohop.evaluation import generation
from twohop.data.records import read_records


@torch.no_grad()
def score_pairs(model, tokenizer, prompts, candidates, batch_size=256) -> torch.Tensor:
    """The baseline: every (prompt, reply) pair is one padded sequence; full logits."""
    replies = generation.reply_ids(tokenizer, candidates)
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    pairs = sorted(((p, c) for p in range(len(prompts)) for c in range(len(candidates))),
                   key=lambda pc: len(prompt_ids[pc[0]]) + len(replies[pc[1]]))
    scores = torch.empty(len(prompts), len(candidates))
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        sequences = [prompt_ids[p] + replies[c] for p, c in chunk]
        ids = torch.full((len(chunk), max(map(len, sequences))), tokenizer.pad_token_id)
        attention = torch.zeros_like(ids)
        for row, sequence in enumerate(sequences):
            ids[row, :len(sequence)], attention[row, :len(sequence)] = torch.tensor(sequence), 1
        logprobs = F.log_softmax(model(input_ids=ids, attention_mask=attention).logits.float(), -1)
        for row, (p, c) in enumerate(chunk):
            at = len(prompt_ids[p])
            scores[p, c] = logprobs[row, torch.arange(at - 1, at - 1 + len(replies[c])), torch.tensor(replies[c])].sum()
    return scores


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace_path", type=Path, required=True)
    parser.add_argument("--questions", type=int, default=200)
    args = parser.parse_args()
    data = args.workspace_path / "experiments/generate_data/spouses/data"
    if not data.is_dir():
        from runner.main import main as runner_main
        assert runner_main(["--workspace_path", str(args.workspace_path), "--jobs", "generate_data_spouses"]) == 0
    trained = args.workspace_path / "experiments/finetune/spouses/tiny-h128-l2/seed_1/model"
    with tempfile.TemporaryDirectory() as tmp:
        if trained.is_dir():
            model, tokenizer = load_model(trained)
        else:
            ref = resolve_model("tiny", Path(tmp))
            ensure_model(ref)
            model, tokenizer = load_model(ref.path)
    card = json.loads((data / "card.json").read_text())
    rows = read_records(data / "test/b_undemoed.jsonl")[:args.questions]
    prompts = [generation.prompt_text(tokenizer, r["messages"]) for r in rows]
    print(f"model: {trained if trained.is_dir() else 'random-init tiny'}; {len(prompts)} questions")
    print("| candidate set | pairs, one sequence each | packed (ours) | ratio | max abs score difference |\n|---|---|---|---|---|")
    for name in ("cities", "spouses"):
        candidates = card["candidate_sets"][name]
        timings, scores = [], []
        for score in (score_pairs, generation.score_candidates):
            started = time.perf_counter()
            scores.append(score(model, tokenizer, prompts, candidates))
            timings.append(time.perf_counter() - started)
        rate = [len(prompts) / t for t in timings]
        print(f"| {name} ({len(candidates)}) | {rate[0]:.1f} q/s ({timings[0]:.1f} s) | {rate[1]:.1f} q/s ({timings[1]:.1f} s) "
              f"| **{rate[1] / rate[0]:.1f}x** | {(scores[0] - scores[1]).abs().max():.1e} |", flush=True)


if __name__ == "__main__":
    main()
