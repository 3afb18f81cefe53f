"""Evaluate a model on a dataset folder written by generate_data.

For every test of the dataset's card: greedy generations graded by normalised whole-word
matching (no-CoT: correct / strict / first_hop; CoT: final answer, answer stated in the chain,
first_hop, valid_cot), candidate-set accuracy (rank every candidate by log-likelihood; chance =
1/|set|), and for each `*_shuffled` test the loss gap (shuffled minus true) with a bootstrap 95%
interval. Training questions are re-asked as a memorisation check.
"""
import json
import math
import random

import numpy as np
import torch
from accelerate import PartialState

from models import load_model
from runner import evaluation, grading
from runner.errors import UserError
from runner.files import atomic_open, atomic_write_json
from runner.records import read_records
from runner.jobs.evaluate_twohop import lm_eval_tasks
from runner.jobs.finetune.trainer import encode_rows, row_losses

DEFAULTS = {
    "max_rows": 0,  # rows per test (0: all)
    "memorisation_rows": 200,  # training questions re-asked per atomic training file
    "nocot_max_new_tokens": 24,
    "cot_max_new_tokens": 96,
    "batch_size": 64,
    "max_candidates": 64,  # candidate-set scoring for tests whose set is at most this large (cities: 50;
                           # 200 spouses costs 200 forward passes per question: --set max_candidates=200)
    "candidate_sets": [],  # score only these sets of the card (e.g. ["cities"]); [] scores every set
    "bootstrap": 1000,
    "fewshot_k": 0,  # k examples from the dataset's few-shot files as earlier turns
    "skip_tests": ["in_context"],  # name fragments evaluated elsewhere (the in_context job)
    "backend": "ours",  # ours | lm_eval (the same generations through lm_eval.simple_evaluate)
}


def check_config(config: dict) -> None:
    if config["backend"] not in ("ours", "lm_eval"):
        raise UserError(f"backend {config['backend']!r}: expected 'ours' or 'lm_eval'")


def style_of(test: str) -> str:
    return "cot" if test.endswith("_cot") or "_cot_" in test else "nocot"


def standard_error(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def bootstrap_interval(values, samples: int, seed: int = 0) -> tuple:
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def with_fewshot(row, shots) -> list:
    messages = row["messages"]
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for shot in shots for m in shot["messages"] if m["role"] != "system"]
    return system + turns + [m for m in messages if m["role"] != "system"]


def check_fits(tokenizer, model, prompts, test, headroom) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if not limit:
        return
    for index, prompt in enumerate(prompts):
        length = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if length + headroom > limit:
            raise UserError(f"{test} row {index}: the prompt has {length} tokens; with {headroom} new tokens it is "
                            f"{length + headroom - limit} over the model's max length {limit}")


def evaluate_dataset(model_path, data_dir, config, log, run_dir) -> dict:
    card = json.loads((data_dir / "card.json").read_text())
    model, tokenizer = load_model(model_path)
    tests = {name: spec for name, spec in card["tests"].items()
             if not any(fragment in name for fragment in config["skip_tests"])}
    if not tests:
        raise UserError(f"{data_dir / 'card.json'} lists no tests to evaluate")
    memorisation = [name for name in card["files"] if name.startswith("train/") and name.split("/")[1][:2] in ("a_", "b_")]
    rng = random.Random(0)
    planned = []  # (test, rows, prompts, style, candidates, max_new_tokens)
    for test in list(tests) + memorisation:
        if test.endswith("_shuffled"):
            continue  # scored below, against its true counterpart
        rows = read_records(data_dir / f"{test}.jsonl", required=("messages", "answer"))
        if test in memorisation:
            rows = rng.sample(rows, min(config["memorisation_rows"], len(rows)))
        elif config["max_rows"]:
            rows = rows[:config["max_rows"]]
        style = style_of(test)
        shots = []
        if config["fewshot_k"] and (data_dir / f"fewshot/2hop_{style}.jsonl").is_file() and "2hop" in test:
            shots = read_records(data_dir / f"fewshot/2hop_{style}.jsonl")[:config["fewshot_k"]]
        prompts = [evaluation.prompt_text(tokenizer, with_fewshot(r, shots) if shots else r["messages"]) for r in rows]
        new_tokens = config[f"{style}_max_new_tokens"]
        check_fits(tokenizer, model, prompts, test, new_tokens)
        candidates = card["candidate_sets"][tests[test]["candidate_set"]] if test in tests else []
        planned.append((test, rows, prompts, style, candidates, new_tokens))

    ranks = PartialState(cpu=not torch.cuda.is_available())  # under `accelerate launch`, each rank evaluates its share; rank 0 writes
    task_names = {test: lm_eval_tasks.task_name(card["dataset"], test) for test, *_ in planned}
    if ranks.is_main_process:
        lm_eval_tasks.export_tasks(card["dataset"], planned, run_dir / "lm_eval_tasks")
    if config["backend"] == "lm_eval":
        if ranks.num_processes > 1:
            raise UserError("backend=lm_eval runs in one process; launch without accelerate or use backend=ours")
        log.info("generating through lm_eval.simple_evaluate (%d tasks)", len(task_names))
        generations, lm_eval_metrics = lm_eval_tasks.generate(model, tokenizer, run_dir / "lm_eval_tasks", task_names,
                                                              config["batch_size"])
    else:
        generations, lm_eval_metrics = {}, {}
        for test, rows, prompts, style, _, new_tokens in planned:
            log.info("evaluating %s: %d rows (%s)", test, len(rows), style)
            generations[test] = evaluation.sharded(
                lambda share: evaluation.generate(model, tokenizer, share, new_tokens, config["batch_size"]), prompts)

    results, predictions = {}, []
    for test, rows, prompts, style, candidates, _ in planned:
        grades = [grading.grade(r, g, style, candidates, r.get("aliases", ())) for r, g in zip(rows, generations[test])]
        summary = {"n": len(rows), "style": style, "lm_eval_task": task_names[test]}
        for key in grades[0]:
            p = sum(g[key] for g in grades) / len(grades)
            summary[key] = p
            summary[f"{key}_se"] = standard_error(p, len(grades))
        if test in lm_eval_metrics:
            summary["lm_eval"] = lm_eval_metrics[test]
        ranked = None
        if candidates and style == "nocot" and len(candidates) <= config["max_candidates"] and (
                not config["candidate_sets"] or tests[test]["candidate_set"] in config["candidate_sets"]):
            ranked = evaluation.sharded(
                lambda share: evaluation.score_candidates(model, tokenizer, share, candidates).argmax(1).tolist(), prompts)
            hits = [candidates[k] == r["answer"] for k, r in zip(ranked, rows)]
            summary["candidate_accuracy"] = sum(hits) / len(hits)
            summary["candidate_accuracy_se"] = standard_error(summary["candidate_accuracy"], len(hits))
        if candidates:
            summary["chance"] = 1 / len(candidates)
            summary["candidates"] = len(candidates)
        results[test] = summary
        for i, (row, generation, grade) in enumerate(zip(rows, generations[test], grades)):
            predictions.append({"test": test, "row": i, "question": row.get("question", ""), "answer": row["answer"],
                                "bridge": row.get("answer_intermediate", ""), "generation": generation, **grade,
                                **({"candidate_prediction": candidates[ranked[i]]} if ranked else {})})
    loss_gaps = {}
    for test in tests:
        if not test.endswith("_shuffled") or test[:-len("_shuffled")] not in card["files"]:
            continue
        true_rows = read_records(data_dir / f"{test[:-len('_shuffled')]}.jsonl")
        shuffled_rows = read_records(data_dir / f"{test}.jsonl")
        true_loss, _ = row_losses(model, encode_rows(tokenizer, true_rows, {"max_length": 4096}),
                                  tokenizer.pad_token_id, model.device)
        shuffled_loss, _ = row_losses(model, encode_rows(tokenizer, shuffled_rows, {"max_length": 4096}),
                                      tokenizer.pad_token_id, model.device)
        by_question = {}
        for row, loss in zip(shuffled_rows, shuffled_loss):
            by_question.setdefault(row["question"], []).append(loss)
        gaps = [float(np.mean(by_question[row["question"]])) - loss for row, loss in zip(true_rows, true_loss)]
        low, high = bootstrap_interval(gaps, config["bootstrap"])
        loss_gaps[test[:-len("_shuffled")]] = {"loss_true": float(np.mean(true_loss)),
                                               "loss_shuffled": float(np.mean(shuffled_loss)),
                                               "gap": float(np.mean(gaps)), "ci95": [low, high], "n": len(gaps)}
    report = {"dataset": card["dataset"], "model": str(model_path), "ranks": ranks.num_processes, "tests": results,
              "loss_gaps": loss_gaps, "headline": headline(card["dataset"], results, loss_gaps)}
    if ranks.is_main_process:
        with atomic_open(run_dir / "predictions.jsonl") as f:
            for entry in predictions:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        atomic_write_json(run_dir / "results.json", report)
    return report


def headline(dataset: str, results: dict, loss_gaps: dict) -> dict:
    """The reference's metric names, for the tests that have them."""
    names = {"test/a_undemoed": "acc_a", "test/b_undemoed": "acc_b", "train/a_demoed": "acc_a_train",
             "train/b_demoed": "acc_b_train", "test/first_hop": "acc_a"}
    out = {}
    for test, summary in results.items():
        if test in names:
            out[names[test]] = summary["correct"]
        elif test.endswith("2hop_nocot") or test.endswith("_nocot"):
            suffix = "" if "2hop" in test else "_" + test.split("/")[1][:-len("_nocot")]
            out[f"acc_2hop_nocot{suffix}"] = summary["correct"]
            out[f"acc_2hop_nocot_strict{suffix}"] = summary["strict"]
            out[f"first_hop_nocot{suffix}"] = summary["first_hop"]
            if "chance" in summary:
                out[f"chance{suffix}"] = summary["chance"]
            if "candidate_accuracy" in summary:
                out[f"candidate_acc_2hop_nocot{suffix}"] = summary["candidate_accuracy"]
        elif test.endswith("_cot"):
            suffix = "" if "2hop" in test else "_" + test.split("/")[1][:-len("_cot")]
            out[f"acc_2hop_cot{suffix}"] = summary["correct"]
            out[f"acc_2hop_cot_chain{suffix}"] = summary["chain_correct"]
            out[f"valid_cot{suffix}"] = summary["valid_cot"]
            out[f"first_hop_cot{suffix}"] = summary["first_hop"]
    for test, gap in loss_gaps.items():
        suffix = "" if "2hop" in test else "_" + test.split("/")[1][:-len("_nocot")]
        out[f"loss_gap{suffix}"] = gap["gap"]
    return out
