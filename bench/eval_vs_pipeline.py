"""Evaluation speed: our batched evaluator vs. a transformers `pipeline`, one question at a time.

Same model, same rendered prompts, greedy decoding in both arms, one process. Prints questions/s
for both, the ratio, and whether every prediction is identical. Usage:

    python bench/eval_vs_pipeline.py --workspace_path W [--questions 500] [--model_path PATH]

The model defaults to what `finetune_spouses` trained in W (a trained model stops at its end of
turn, as a real evaluation does); the questions are the spouses study's no-CoT questions (test
and training, atomic and two-hop) and its CoT two-hop questions.
"""
import argparse
import time
from pathlib import Path

import torch
from transformers import pipeline

from models import load_model
from twohop.evaluation import generation
from twohop.data.records import read_records

NOCOT_FILES = ["test/2hop_nocot", "test/a_undemoed", "test/b_undemoed", "train/2hop_nocot"]
COT_FILES = ["test/2hop_cot", "train/2hop_cot"]


def questions(data: Path, files, count: int) -> list:
    rows = [row for name in files for row in read_records(data / f"{name}.jsonl")]
    if len(rows) < count:
        raise SystemExit(f"only {len(rows)} questions in {', '.join(files)} under {data}; lower --questions")
    return rows[:count]


def timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace_path", type=Path, required=True)
    parser.add_argument("--model_path", type=Path, help="default: W's finetune_spouses model (tiny, seed 1)")
    parser.add_argument("--questions", type=int, default=500)
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args()
    data = args.workspace_path / "experiments/generate_data/spouses/data"
    model_path = args.model_path or args.workspace_path / "experiments/finetune/spouses/tiny-h128-l2/seed_1/model"
    if not model_path.is_dir():
        raise SystemExit(f"no model at {model_path}; run `python runner/main.py --workspace_path "
                         f"{args.workspace_path} --jobs finetune_spouses` first or pass --model_path")
    model, tokenizer = load_model(model_path)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer, device=model.device)
    stop = generation.stop_token_ids(model, tokenizer)
    print(f"model {model_path}, {torch.get_num_threads()} threads, {args.questions} questions per style")
    for style, files, new_tokens in (("no-CoT", NOCOT_FILES, 24), ("CoT", COT_FILES, 96)):
        prompts = [generation.prompt_text(tokenizer, row["messages"]) for row in questions(data, files, args.questions)]
        generation.generate(model, tokenizer, prompts[:8], new_tokens, args.batch_size)  # warm-up
        ours, ours_s = timed(lambda: generation.generate(model, tokenizer, prompts, new_tokens, args.batch_size))
        baseline, baseline_s = timed(lambda: [
            generator(p, max_new_tokens=new_tokens, do_sample=False, return_full_text=False, eos_token_id=stop,
                      pad_token_id=tokenizer.pad_token_id)[0]["generated_text"].strip() for p in prompts])
        same = sum(a == b for a, b in zip(ours, baseline))
        print(f"  {style:<7} pipeline one at a time {len(prompts) / baseline_s:8.1f} q/s ({baseline_s:6.1f} s)   "
              f"ours batched {len(prompts) / ours_s:8.1f} q/s ({ours_s:5.1f} s)   "
              f"ratio {baseline_s / ours_s:5.1f}x   identical predictions {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
