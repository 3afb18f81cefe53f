"""Evaluate a model on a dataset folder written by generate_data, as its card declares.

For every test of the card (its kind, style, candidate set and shuffled baseline are read from the
card, never from file names): greedy generations graded by normalised whole-word matching (no-CoT:
correct / strict / first_hop; CoT: final answer, answer stated in the chain, first_hop, valid_cot),
candidate-set accuracy (rank every candidate by log-likelihood; chance = 1/|set|), and for each
shuffled test the loss gap (shuffled minus true) with a bootstrap 95% interval. The card's
memorisation files (training questions) are re-asked as a check.
"""
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from accelerate import PartialState

from models import load_model
from runner.config import option
from runner.errors import UserError
from runner.files import atomic_open, atomic_write_json
from twohop.data.dataset import with_shortcut_flags
from twohop.data.records import read_records
from twohop.evaluation import generation, grading, lm_eval_tasks
from twohop.stats import binomial_se, bootstrap_interval
from twohop.training.batching import encode_rows
from twohop.training.losses import row_losses


@dataclass
class EvaluationConfig:
    max_rows: int = option(0, "rows per test (0: all)", minimum=0)
    memorisation_rows: int = option(200, "training questions re-asked per memorisation file of the card", minimum=0)
    nocot_max_new_tokens: int = option(24, "generation length without a chain of thought", minimum=1)
    cot_max_new_tokens: int = option(96, "generation length with a chain of thought", minimum=1)
    batch_size: int = option(64, "prompts per forward pass", minimum=1)
    max_candidates: int = option(64, "score candidate sets of at most this many answers (cities: 50; the 200 "
                                      "spouses cost 200 continuations a question: --set max_candidates=200)", minimum=0)
    candidate_sets: list[str] = option([], "score only these candidate sets of the card ([]: every set)")
    bootstrap: int = option(1000, "bootstrap resamples of the loss gap's interval", minimum=10)
    fewshot_k: int = option(0, "examples from the card's few-shot files as earlier turns of two-hop tests",
                            minimum=0)
    skip_kinds: list[Literal["hop_a", "hop_b", "two_hop", "couples", "in_context"]] = option(
        ["in_context"], "test kinds not evaluated here (in_context has its own job)")
    skip_tests: list[str] = option([], "card tests not evaluated, by name (e.g. test/couples)")
    backend: Literal["ours", "lm_eval"] = option("ours", "generate with our batched generator, or through "
                                                         "lm_eval.simple_evaluate (the same prompts and grader)")
    also_before: list[Literal["hop_a", "hop_b", "two_hop", "couples"]] = option(
        [], "test kinds also graded on the model the fine-tune started from (e.g. hop_b: is the fact still known?)")


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


def test_path(card: dict, data_dir, name: str) -> Path:
    """Where a card's file is: a card synthesised for given files names them (`paths`); a generated
    dataset's files lie beside its card."""
    return Path(card["paths"][name]) if "paths" in card else Path(data_dir) / f"{name}.jsonl"


def selected_tests(card: dict, config: dict, data_dir) -> dict:
    """The card's tests this evaluation covers (shuffled baselines included: their loss is scored)."""
    where = card.get("source") or Path(data_dir) / "card.json"
    unknown = set(config["skip_tests"]) - set(card["tests"])
    if unknown:
        raise UserError(f"skip_tests: {sorted(unknown)} are not tests of {where}")
    tests = {name: spec for name, spec in card["tests"].items()
             if spec["kind"] not in config["skip_kinds"] and name not in config["skip_tests"]}
    if not tests:
        raise UserError(f"{where} lists no tests to evaluate")
    return tests


def chats(card, data_dir, spec, rows, config) -> list:
    """The chats a test asks: each row's, after the card's few-shot examples (`fewshot_k` of them, two-hop
    tests) or the test's own few-shot file, with the test's system prompt if it sets one."""
    shots, fewshot_file = [], card.get("fewshot", {}).get(spec["style"])
    if config["fewshot_k"] and fewshot_file and spec["kind"] == "two_hop":
        shots = read_records(test_path(card, data_dir, fewshot_file))[:config["fewshot_k"]]
    if spec.get("fewshot_file"):
        shots = read_records(spec["fewshot_file"])
    chats = [with_fewshot(r, shots) if shots else r["messages"] for r in rows]
    if spec.get("system"):
        chats = [[{"role": "system", "content": spec["system"]}] + [m for m in c if m["role"] != "system"] for c in chats]
    return chats


def plan_generations(card, tests, data_dir, config, model, tokenizer) -> list:
    """(test, spec, rows, prompts, candidates, max_new_tokens) for every test and memorisation file asked.
    A test's spec may set its own `rows`, `system` prompt, `fewshot_file` and `max_new_tokens` (an entry of
    a reference experiment's `evaluations:` block)."""
    rng, planned = random.Random(0), []
    asked = {**{n: s for n, s in tests.items() if not s["shuffled_of"]}, **card.get("memorisation", {})}
    for test, spec in asked.items():
        rows = with_shortcut_flags(read_records(test_path(card, data_dir, test), required=("messages", "answer")))
        if test in card.get("memorisation", {}):
            rows = rng.sample(rows, min(config["memorisation_rows"], len(rows)))
        elif spec.get("rows") or config["max_rows"]:
            rows = rows[:spec.get("rows") or config["max_rows"]]
        prompts = [generation.prompt_text(tokenizer, chat) for chat in chats(card, data_dir, spec, rows, config)]
        new_tokens = spec.get("max_new_tokens") or config[f"{spec['style']}_max_new_tokens"]
        check_fits(tokenizer, model, prompts, test, new_tokens)
        candidates = card["candidate_sets"][spec["candidate_set"]] if test in tests else []
        planned.append((test, spec, rows, prompts, candidates, new_tokens))
    return planned


def generate_all(planned, model, tokenizer, config, ranks, run_dir, card, log) -> tuple:
    """(generations per test, lm-eval's own metrics per test); every test is also exported as an lm-eval task."""
    task_names = {test: lm_eval_tasks.task_name(card["dataset"], test) for test, *_ in planned}
    exported = [(test, rows, prompts, spec["style"], candidates, tokens)
                for test, spec, rows, prompts, candidates, tokens in planned]
    if ranks.is_main_process:
        lm_eval_tasks.export_tasks(card["dataset"], exported, run_dir / "lm_eval_tasks")
    if config["backend"] == "lm_eval":
        if ranks.num_processes > 1:
            raise UserError("backend=lm_eval runs in one process; launch without accelerate or use backend=ours")
        log.info("generating through lm_eval.simple_evaluate (%d tasks)", len(task_names))
        return lm_eval_tasks.generate(model, tokenizer, run_dir / "lm_eval_tasks", task_names, config["batch_size"])
    generations = {}
    for test, spec, rows, prompts, _, new_tokens in planned:
        log.info("evaluating %s: %d rows (%s)", test, len(rows), spec["style"])
        generations[test] = generation.sharded(
            lambda share: generation.generate(model, tokenizer, share, new_tokens, config["batch_size"]), prompts)
    return generations, {}


def rates(grades: list) -> dict:
    """Each grade's rate with its standard error over the rows where it applies (None where it applies to
    none: first-hop grades without a bridge), and how often each grading rule decided."""
    summary = {}
    for key in [k for k in grades[0] if k != "rule"] if grades else []:
        applicable = [g[key] for g in grades if g[key] is not None]
        summary[key] = sum(applicable) / len(applicable) if applicable else None
        summary[f"{key}_se"] = binomial_se(summary[key], len(applicable)) if applicable else None
    summary["rules"] = dict(Counter(g["rule"] for g in grades))
    return summary


def score_test(test, spec, rows, prompts, candidates, generations, config, model, tokenizer) -> tuple:
    """(summary, predictions) of one test: graded generations and, for no-CoT, candidate ranking.
    Rows flagged as shortcuts (the answer is in a name the question gives away) are scored apart, in
    `summary["shortcut"]`, and left out of every other figure."""
    grades = [grading.grade(r, g, spec["style"], candidates, r.get("aliases", ())) for r, g in zip(rows, generations)]
    answers = [grading.split_aliases(r["answer"])[0] for r in rows]
    kept = [i for i, r in enumerate(rows) if not r.get("shortcut")]
    flagged = [i for i, r in enumerate(rows) if r.get("shortcut")]
    summary = {"n": len(kept), "style": spec["style"], "kind": spec["kind"], "attribute": spec["attribute"],
               **rates([grades[i] for i in kept])}
    if flagged:
        summary["shortcut"] = {"n": len(flagged), "correct": sum(grades[i]["correct"] for i in flagged) / len(flagged)}
    ranked = None
    if candidates and spec["style"] == "nocot" and len(candidates) <= config["max_candidates"] and kept and (
            not config["candidate_sets"] or spec["candidate_set"] in config["candidate_sets"]):
        ranked = generation.sharded(
            lambda share: generation.score_candidates(model, tokenizer, share, candidates).argmax(1).tolist(), prompts)
        summary["candidate_accuracy"] = sum(candidates[ranked[i]] == answers[i] for i in kept) / len(kept)
        summary["candidate_accuracy_se"] = binomial_se(summary["candidate_accuracy"], len(kept))
    if candidates:
        summary["chance"], summary["candidates"] = 1 / len(candidates), len(candidates)
    if kept:  # what answering every question with the commonest answer scores: chance for a constant guesser
        summary["majority"] = max(Counter(answers[i] for i in kept).values()) / len(kept)
    predictions = [{"test": test, "row": i, "question": row.get("question", ""), "answer": row["answer"],
                    "bridge": row.get("answer_intermediate", ""), "generation": generated, **grade,
                    **({"shortcut": row["shortcut"]} if row.get("shortcut") else {}),
                    **({"candidate_prediction": candidates[ranked[i]]} if ranked else {})}
                   for i, (row, generated, grade) in enumerate(zip(rows, generations, grades))]
    return summary, predictions


def loss_gap(true_file, shuffled_file, model, tokenizer, samples: int) -> dict:
    """Mean loss of the shuffled answers minus the true answer's, per question, with a bootstrap interval."""
    true_rows = [r for r in with_shortcut_flags(read_records(true_file)) if not r["shortcut"]]  # a name gives it away
    questions = {r["question"] for r in true_rows}
    shuffled_rows = [r for r in read_records(shuffled_file) if r["question"] in questions]
    if not true_rows:
        return None
    true_loss, _ = row_losses(model, encode_rows(tokenizer, true_rows, {"max_length": 4096}),
                              tokenizer.pad_token_id, model.device)
    shuffled_loss, _ = row_losses(model, encode_rows(tokenizer, shuffled_rows, {"max_length": 4096}),
                                  tokenizer.pad_token_id, model.device)
    by_question = {}
    for row, loss in zip(shuffled_rows, shuffled_loss):
        by_question.setdefault(row["question"], []).append(loss)
    gaps = [float(np.mean(by_question[row["question"]])) - loss for row, loss in zip(true_rows, true_loss)]
    low, high = bootstrap_interval(gaps, samples)
    return {"loss_true": float(np.mean(true_loss)), "loss_shuffled": float(np.mean(shuffled_loss)),
            "gap": float(np.mean(gaps)), "ci95": [low, high], "n": len(gaps)}


def evaluate_dataset(model_path, data_dir, config, log, run_dir, card=None) -> dict:
    """Evaluate every test of `card` (default: the card of the dataset folder `data_dir`) into `run_dir`."""
    card = card or json.loads((data_dir / "card.json").read_text())
    tests = selected_tests(card, config, data_dir)
    model, tokenizer = load_model(model_path)
    planned = plan_generations(card, tests, data_dir, config, model, tokenizer)
    ranks = PartialState(cpu=not torch.cuda.is_available())  # under `accelerate launch`, each rank evaluates its share
    generations, lm_eval_metrics = generate_all(planned, model, tokenizer, config, ranks, run_dir, card, log)
    results, predictions = {}, []
    for test, spec, rows, prompts, candidates, _ in planned:
        summary, rows_predicted = score_test(test, spec, rows, prompts, candidates, generations[test], config, model,
                                             tokenizer)
        summary["lm_eval_task"] = lm_eval_tasks.task_name(card["dataset"], test)
        if test in lm_eval_metrics:
            summary["lm_eval"] = lm_eval_metrics[test]
        results[test] = summary
        predictions.extend(rows_predicted)
    loss_gaps = {spec["shuffled_of"]: loss_gap(test_path(card, data_dir, spec["shuffled_of"]),
                                               test_path(card, data_dir, test), model, tokenizer, config["bootstrap"])
                 for test, spec in tests.items() if spec["shuffled_of"]}
    loss_gaps = {test: gap for test, gap in loss_gaps.items() if gap is not None}
    specs = {**card["tests"], **card.get("memorisation", {})}
    report = {"dataset": card["dataset"], "model": str(model_path), "ranks": ranks.num_processes, "tests": results,
              "loss_gaps": loss_gaps, "headline": headline(specs, results, loss_gaps)}
    if ranks.is_main_process:  # rank 0 writes
        with atomic_open(run_dir / "predictions.jsonl") as f:
            for entry in predictions:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        atomic_write_json(run_dir / "results.json", report)
    return report


def evaluate_before(model_path, data_dir, config, log, run_dir) -> tuple:
    """The `also_before` kinds graded on the model a fine-tune started from, in `run_dir`: (their test
    summaries, their headline with each metric suffixed `_before`)."""
    kinds = {"hop_a", "hop_b", "two_hop", "couples", "in_context"}
    before = evaluate_dataset(model_path, data_dir, {**config, "skip_kinds": sorted(kinds - set(config["also_before"])),
                                                     "memorisation_rows": 0, "fewshot_k": 0}, log, run_dir)
    return before["tests"], {f"{name}_before": value for name, value in before["headline"].items()}


def headline(specs: dict, results: dict, loss_gaps: dict) -> dict:
    """The reference's metric names: a test's declared `metric`, and for two-hop tests the family of
    names `acc_2hop_<style>[_<attribute>]` and its companions."""
    out = {}
    for test, summary in results.items():
        spec = specs[test]
        if "correct" not in summary:  # every row was a shortcut: nothing to report under the headline
            continue
        suffix = f"_{spec['attribute']}" if spec["attribute"] else ""
        if spec["metric"]:
            out[spec["metric"]] = summary["correct"]
        elif spec["kind"] == "two_hop" and spec["style"] == "nocot":
            out.update({f"acc_2hop_nocot{suffix}": summary["correct"], f"acc_2hop_nocot_strict{suffix}": summary["strict"],
                        f"first_hop_nocot{suffix}": summary["first_hop"]})
            out.update({f"{name}{suffix}": summary[key] for name, key in
                        (("chance", "chance"), ("candidate_acc_2hop_nocot", "candidate_accuracy")) if key in summary})
        elif spec["kind"] == "two_hop":
            out.update({f"acc_2hop_cot{suffix}": summary["correct"], f"acc_2hop_cot_chain{suffix}": summary["chain_correct"],
                        f"valid_cot{suffix}": summary["valid_cot"], f"first_hop_cot{suffix}": summary["first_hop"]})
    for test, gap in loss_gaps.items():
        out[f"loss_gap{'_' + specs[test]['attribute'] if specs[test]['attribute'] else ''}"] = gap["gap"]
    return out
