"""How long the seed note's GPT-2 small experiment takes here, from a GPT-2 small shape with random weights.

No GPT-2 weights can be downloaded here, so this builds the shape instead: 12 layers, 768 wide, 12 heads,
1,024 positions, a 50,257-row vocabulary (124M parameters, random init), with a GPT-2-style tokenizer
(byte-level BPE without a prefix space, the project's first names as single tokens; `tests/test_ioi.py`'s
builder), saved as `W/transformers/gpt2-small-shape`. It then runs the README's command for the
experiment on it, cut short: `finetune_ioi_3obj` for `--steps` steps and `circuits_ioi_3obj` (before and
after, `compare_finetune`) on `--pairs` pairs per task, and reads what the runs recorded: the trainer's
`train_seconds` over its steps, and the circuit discovery's seconds per model and task.

It prints those measurements and their linear scaling to the default recipe (1,000 training rows x 3
epochs in batches of 16 = 189 steps; an evaluation of every family's test at the start and after each epoch;
200 test pairs per task, two tasks, two models). The scaling is an estimate: it assumes time linear in
steps and in pairs, and an evaluation as long as the short run's (its run time less its loop, per
evaluation, so job start-up is counted in it). Compute is GPT-2 small's; the
answers are meaningless (random weights), which does not change the work done.

    python bench/gpt2_ioi_time.py --workspace_path W [--steps 10] [--pairs 16]
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GPT2_SMALL = {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024, "vocab_size": 50257}
RECIPE_STEPS = 3 * -(-1000 // 16)  # 189: finetune's ioi epochs x batches of 16 in generate_data_ioi's 1,000 rows
RECIPE_PAIRS = 200  # generate_data_ioi's test_per_family


def build(folder: Path) -> None:
    from tests.test_ioi import gpt2_style
    from twohop.data import tables
    if not (folder / "config.json").is_file():
        gpt2_style(folder, tables.names()[0], **GPT2_SMALL)


def run_jobs(workspace: Path, steps: int, pairs: int) -> float:
    command = [sys.executable, str(ROOT / "runner/main.py"), "--workspace_path", str(workspace),
               "--jobs", "finetune_ioi_3obj", "circuits_ioi_3obj", "--model", "gpt2-small-shape",
               "--set", f"finetune_ioi_3obj.max_steps={steps}", "--set", f"circuits_ioi_3obj.max_items={pairs}",
               "--set", "circuits_ioi_3obj.compare_finetune=true"]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def run_folder(workspace: Path, job: str, subjob: str) -> Path:
    folders = sorted((workspace / "experiments" / job / subjob / "gpt2-small-shape").rglob("status.json"))
    if not folders:
        raise SystemExit(f"no {job}_{subjob} run under {workspace}/experiments")
    return folders[-1].parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace_path", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=10, help="fine-tuning steps to time")
    parser.add_argument("--pairs", type=int, default=16, help="clean/corrupted pairs per task to time")
    args = parser.parse_args()
    build(args.workspace_path / "transformers" / "gpt2-small-shape")
    wall = run_jobs(args.workspace_path, args.steps, args.pairs)
    finetune = run_folder(args.workspace_path, "finetune", "ioi_3obj")
    # The loop's own time: the last logged training step's tokens over its running rate (the trainer's
    # train_seconds also counts the closing evaluation of every family's test, 256 rows each).
    logged = [json.loads(line) for line in (finetune / "metrics.jsonl").read_text().splitlines() if line]
    last = [entry for entry in logged if entry.get("event") == "train"][-1]
    loop_seconds = last["tokens"] / last["tokens_per_s"]
    per_step, evaluations = loop_seconds / last["step"], sum(1 for entry in logged if entry.get("event") == "eval")
    circuits = json.loads((run_folder(args.workspace_path, "circuits", "ioi_3obj") / "results.json").read_text())
    per_pair = {f"{model} {task}": seconds / args.pairs for task, by_model in circuits["seconds"].items()
                for model, seconds in by_model.items()}
    durations = {job: json.loads((run_folder(args.workspace_path, job, sub) / "status.json").read_text())["duration_s"]
                 for job, sub in (("finetune", "ioi_3obj"), ("circuits", "ioi_3obj"))}
    print(f"measured: {last['step']} steps in {loop_seconds:.1f} s ({per_step:.2f} s/step, {last['tokens_per_s']:.0f} "
          f"tokens/s); finetune run {durations['finetune']:.0f} s with {evaluations} evaluations of every family's "
          f"test; circuits run {durations['circuits']:.0f} s; whole command {wall:.0f} s")
    for name, seconds in per_pair.items():
        print(f"  circuits {name}: {seconds:.2f} s per pair")
    train_estimate, circuits_estimate = per_step * RECIPE_STEPS, sum(per_pair.values()) * RECIPE_PAIRS
    evaluation = (durations["finetune"] - loop_seconds) / evaluations
    print(f"scaled to the default recipe: fine-tune {RECIPE_STEPS} steps ~ {train_estimate / 60:.0f} min plus 4 "
          f"evaluations (start and each of 3 epochs) ~ {4 * evaluation / 60:.0f} min, circuits {RECIPE_PAIRS} pairs x "
          f"{len(per_pair)} (model, task) ~ {circuits_estimate / 60:.0f} min")


if __name__ == "__main__":
    main()
