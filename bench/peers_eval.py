"""Generation-graded evaluation: our evaluator vs. lm-eval's own Hugging Face back end, in one run.

Both arms answer the same exported tasks (`evaluate_twohop`'s `lm_eval_tasks/` folder: the
prompts rendered with the model's chat template, greedy, each task's `max_gen_toks`) with the same
loaded model and the same batch size, and grade with the same grader. lm-eval runs
`simple_evaluate` with `HFLM` (`generate_until`); ours runs `twohop.evaluation.generation.generate`
(length-sorted batches, left padding, KV cache, stop at the end-of-turn token). Each arm is timed
twice and the faster time is kept (the first lm-eval call also builds its task objects). Prints
questions/s per arm, the ratio, how many predictions are identical, and the seconds lm-eval spent
inside `generate_until` (its generation alone, without building tasks, datasets and metrics).

Usage (lm-eval is in requirements.txt):

    python bench/peers_eval.py --workspace_path W [--batch_size 64] [--limit 100]

The model and tasks default to W's `finetune_spouses` (tiny, seed 1) and its `evaluate_twohop_spouses` run.
"""
import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import yaml


def local_tasks(exported: Path, folder: Path, limit: int) -> dict:
    """Copy the exported tasks into `folder` with their data paths pointing at the copy; {task: (the first
    `limit` prompts, max tokens)}."""
    tasks = {}
    shutil.copy(exported / "twohop_grading.py", folder)
    for spec_file in sorted(exported.glob("*.yaml")):
        text = spec_file.read_text(encoding="utf-8")
        spec = yaml.safe_load(text.replace("!function", "function"))
        data = exported / f"{spec['task']}.jsonl"
        shutil.copy(data, folder)
        old = spec["dataset_kwargs"]["data_files"]["test"]
        (folder / spec_file.name).write_text(text.replace(old, str(folder / data.name)), encoding="utf-8")
        prompts = [json.loads(line)["prompt"] for line in data.read_text(encoding="utf-8").splitlines() if line]
        tasks[spec["task"]] = (prompts[:limit], spec["generation_kwargs"]["max_gen_toks"])
    return tasks


def ours(model, tokenizer, tasks: dict, batch_size: int) -> dict:
    from twohop.evaluation import generation
    return {name: generation.generate(model, tokenizer, prompts, max_tokens, batch_size)
            for name, (prompts, max_tokens) in tasks.items()}


def lm_eval_arm(model, tokenizer, tasks: dict, folder: Path, batch_size: int, limit: int, generating: list) -> dict:
    """lm-eval's whole `simple_evaluate` call; the seconds spent inside `generate_until` go to `generating`."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    tokenizer.padding_side = "left"
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              max_length=getattr(model.config, "max_position_embeddings", None))
    generate_until = lm.generate_until

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return generate_until(*args, **kwargs)
        finally:
            generating.append(time.perf_counter() - started)
    lm.generate_until = timed
    output = simple_evaluate(model=lm, tasks=list(tasks), task_manager=TaskManager(include_path=str(folder)),
                             log_samples=True, verbosity="ERROR", limit=limit)
    return {name: [s["resps"][0][0].strip() for s in sorted(output["samples"][name], key=lambda s: s["doc_id"])]
            for name in tasks}


def best_of_two(function):
    times, result = [], None
    for _ in range(2):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return result, min(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace_path", type=Path, required=True)
    parser.add_argument("--model_path", type=Path)
    parser.add_argument("--tasks_path", type=Path, help="an lm_eval_tasks/ folder")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=100, help="the first N questions of each task (lm-eval's limit)")
    args = parser.parse_args()
    import torch
    from models import load_model
    run = args.workspace_path / "experiments"
    model_path = args.model_path or run / "finetune/spouses/tiny-h128-l2/seed_1/model"
    exported = args.tasks_path or run / "evaluate_twohop/spouses/tiny-h128-l2/seed_1/lm_eval_tasks"
    if not model_path.is_dir() or not exported.is_dir():
        raise SystemExit(f"need {model_path} and {exported}: run `python runner/main.py --workspace_path "
                         f"{args.workspace_path} --jobs evaluate_twohop_spouses` first")
    model, tokenizer = load_model(model_path)
    with tempfile.TemporaryDirectory() as tmp:
        tasks = local_tasks(exported, Path(tmp), args.limit)
        n = sum(len(prompts) for prompts, _ in tasks.values())
        print(f"model {model_path}; {len(tasks)} tasks, {n} questions; {torch.get_num_threads()} threads")
        generating = []
        baseline, baseline_s, baseline_times = best_of_two(lambda: lm_eval_arm(model, tokenizer, tasks, Path(tmp),
                                                                               args.batch_size, args.limit, generating))
        mine, mine_s, mine_times = best_of_two(lambda: ours(model, tokenizer, tasks, args.batch_size))
    same = sum(a.strip() == b for name in tasks for a, b in zip(mine[name], baseline[name]))
    print(f"| arm | questions/s | seconds (both runs) |\n|---|---|---|\n"
          f"| lm-eval HF back end (`generate_until`) | {n / baseline_s:,.1f} | {baseline_times[0]:.1f}, {baseline_times[1]:.1f} |\n"
          f"| ours | {n / mine_s:,.1f} | {mine_times[0]:.1f}, {mine_times[1]:.1f} |\n"
          f"ratio {baseline_s / mine_s:.1f}x; identical predictions {same}/{n}\n"
          f"inside lm-eval's generate_until: {', '.join(f'{s:.1f}' for s in generating)} s "
          f"(ratio to ours {min(generating) / mine_s:.1f}x)")


if __name__ == "__main__":
    main()
