"""lm-eval interop: export the evaluated test sets as lm-eval tasks, and generate through lm-eval.

Each test becomes `<folder>/<task>.yaml` plus the `<task>.jsonl` it reads from local disk (rendered
prompts, answers, the grading fields). The grader is `twohop/evaluation/grading.py`, copied next to the YAMLs
as the `process_results` hook, so

    lm_eval --model hf --model_args pretrained=<model folder> --include_path <folder> --tasks <tag or task>

grades exactly as our evaluator does, with no project code on the path. All tasks of one run share
the tag `twohop_<dataset>`.
"""
import json
from pathlib import Path

import yaml

from twohop.evaluation import grading
from runner.files import atomic_open, atomic_write_text

GRADER_MODULE = "twohop_grading"


def task_name(dataset: str, test: str) -> str:
    return f"twohop_{dataset}_{test.replace('/', '_')}"


def exported_doc(row: dict, prompt: str, style: str, candidates) -> dict:
    """One row as lm-eval reads it: the prompt we rendered with the model's chat template (reference rows carry
    only `messages`), and the grading fields with one type per column (the answer as text plus its aliases, the
    bridge as a list of its spellings, [] for none; the entities the bridge is one of), as the JSON loader needs."""
    answer, more = grading.split_aliases(row["answer"])
    bridge, bridge_aliases = grading.split_aliases(row.get("answer_intermediate"))
    return {"prompt": prompt, "answer": answer, "aliases": [*more, *row.get("aliases", ())],
            "answer_intermediate": [bridge, *bridge_aliases] if bridge else [], "e1": row.get("e1", ""),
            "shortcut": row.get("shortcut", ""), "style": style, "candidates": list(candidates) if style == "cot" else [],
            "bridge_candidates": list(row.get("bridge_candidates") or ())}


def export_tasks(dataset: str, tests: list, folder: Path) -> None:
    """Write one task per test; `tests` holds (test, rows, prompts, style, candidates, max_new_tokens)."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / f"{GRADER_MODULE}.py", Path(grading.__file__).read_text(encoding="utf-8"))
    for test, rows, prompts, style, candidates, max_new_tokens in tests:
        name = task_name(dataset, test)
        data_file = (folder / f"{name}.jsonl").resolve()
        with atomic_open(data_file) as f:
            for row, prompt in zip(rows, prompts):
                f.write(json.dumps(exported_doc(row, prompt, style, candidates), ensure_ascii=False) + "\n")
        metrics = ["correct", "chain_correct", "first_hop", "valid_cot"] if style == "cot" else ["correct", "strict", "first_hop"]
        if not any(grading.split_aliases(row.get("answer_intermediate"))[0] for row in rows):
            metrics = [m for m in metrics if m in ("correct", "chain_correct")]  # no bridge: its grades do not apply
        task = {
            "task": name, "tag": [f"twohop_{dataset}"],
            "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}}, "test_split": "test",
            "output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
            "target_delimiter": "",
            # Greedy; the model's generation config ends the reply at its end-of-turn token.
            "generation_kwargs": {"until": [], "max_gen_toks": max_new_tokens, "do_sample": False},
            "process_results": f"!function {GRADER_MODULE}.process_results",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics],
            "metadata": {"version": 1.0},
        }
        text = yaml.safe_dump(task, sort_keys=False, allow_unicode=True)
        # `!function` is a YAML tag lm-eval resolves; safe_dump would quote it as a string.
        text = text.replace(f"'!function {GRADER_MODULE}.process_results'", f"!function {GRADER_MODULE}.process_results")
        atomic_write_text(folder / f"{name}.yaml", text)


def generate(model, tokenizer, folder: Path, names: dict, batch_size: int, samples: dict = None,
             task_manager=None) -> tuple:
    """({test: generations in row order}, {test: lm-eval's own metrics}) via `lm_eval.simple_evaluate`
    on the already-loaded model (with any hooks it carries). `samples` ({test: row indices}) runs only
    those rows; `task_manager` (a `TaskManager` of `folder`) saves its start-up when called again."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tokenizer.padding_side = "left"
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              max_length=getattr(model.config, "max_position_embeddings", None))
    output = simple_evaluate(model=lm, tasks=list(names.values()),
                             task_manager=task_manager or TaskManager(include_path=str(folder)),
                             samples={names[t]: list(rows) for t, rows in samples.items()} if samples else None,
                             log_samples=True, verbosity="WARNING")
    generations, metrics = {}, {}
    for test, name in names.items():
        samples = sorted(output["samples"][name], key=lambda s: s["doc_id"])
        generations[test] = [s["resps"][0][0].strip() for s in samples]
        metrics[test] = {k.split(",")[0]: v for k, v in output["results"][name].items()
                         if k.endswith(",none") and "_stderr" not in k}
    return generations, metrics
