"""Two-hop questions over facts given in the prompt (Experiment 3).

Each test person's two facts are mixed with `n` distractor triplets' facts (2n + 2 shuffled
sentences), then the two-hop question is asked, without or with a chain of thought. The prompts
come from `generate_data`'s world through the same function that writes its in-context test sets,
so the default (10 distractors, seeds 1-3) is exactly those files and a sweep over `n` is cheap.

Per (style, distractors, seed): accuracy (CoT: the final answer; also the answer stated in the
chain), `first_hop` (bridge mentioned), and how wrong answers split: a distractor's e3 ("followed
the wrong chain"), another city ("made one up") or no city, with the distractor share a uniformly
guessed wrong city would give, and `prompt_city_chance`: the accuracy of naming one of the prompt's
birthplaces at random, the baseline for a model that reads the prompt without chaining (9.9% with 10
distractor triplets in the study's test, whose distractors' birthplaces can repeat; uniform chance is 1/50).

The reference repo's own in-context files (`all_in_context_test_{1,2,3}.jsonl`: triplet, context, question,
answer) are graded the same way with the reference's prompt (`evaluate_reference_file`), each file one
replicate; their distractors' e3 are read from the context (twohop.data.reference_in_context).
"""
import statistics
from pathlib import Path

import torch
from accelerate import PartialState

from twohop.evaluation import generation, grading
from twohop.evaluation.evaluate import check_fits
from twohop.data import tables
from twohop.data.reference_in_context import as_records, read_reference_in_context
from twohop.data.spouses import in_context_rows
from twohop.stats import binomial_se, mean_se


def build_rows(world: dict, n_distractors: int, seed: int, style: str) -> list:
    """The in-context test set: every undemoed person, distractors drawn from the whole world."""
    triplets = world["demoed"] + world["undemoed"]
    return in_context_rows(triplets, world["undemoed"], tables.templates("spouses"), tables.templates("system_prompts"),
                           n_distractors, seed, style)


def named_city(text: str, cities, style: str) -> str:
    """The city an answer names: the first in a direct answer, the last in a CoT reply's final part."""
    if style == "cot":
        return grading.chain_answer(grading.split_cot(text)[1], cities)
    found = [(grading.mention_position(text, c), c) for c in cities]
    found = [(p, c) for p, c in found if p is not None]
    return min(found)[1] if found else ""


def grade_row(row: dict, generation: str, style: str, cities, known_cities) -> dict:
    """`cities`: the answer candidates; `known_cities`: every city a model may name (the candidates and more)."""
    grade = grading.grade(row, generation, style, cities)
    city = named_city(generation, known_cities, style)
    wrong = not grade["correct"]
    distractor_cities = set(row["distractor_e3s"]) - {row["answer"]}
    return {**grade, "named_city": city, "wrong_distractor": wrong and city in distractor_cities,
            "wrong_other_city": wrong and bool(city) and city not in distractor_cities,
            "wrong_no_city": wrong and not city,
            # if a wrong answer were a uniform guess among the other cities, it would hit a distractor's this often
            "distractor_chance": len(distractor_cities) / (len(cities) - 1),
            # a model that reads the prompt but does not chain (any birthplace stated there) is right this often
            "prompt_city_chance": 1 / len(distractor_cities | {row["answer"]})}


def summarise(grades: list) -> dict:
    n = len(grades)
    keys = [k for k in grades[0] if isinstance(grades[0][k], bool)]
    out = {"n": n, **{k: sum(g[k] for g in grades) / n for k in keys}}
    out["accuracy"] = out["correct"]
    out["accuracy_se"] = binomial_se(out["accuracy"], n)
    wrong = [g for g in grades if not g["correct"]]
    out["n_wrong"] = len(wrong)
    for kind in ("distractor", "other_city", "no_city"):
        out[f"wrong_{kind}_share"] = sum(g[f"wrong_{kind}"] for g in wrong) / len(wrong) if wrong else None
    out["wrong_distractor_chance"] = sum(g["distractor_chance"] for g in wrong) / len(wrong) if wrong else None
    out["prompt_city_chance"] = sum(g["prompt_city_chance"] for g in grades) / n
    for kind in ("distractor", "other_city", "no_city"):
        out.pop(f"wrong_{kind}")  # shares of the wrong answers are what is meaningful
    return out


def over_seeds(per_seed: dict, key: str) -> dict:
    """Mean and standard error over seeds (the seeds' spread; one seed: the binomial s.e.)."""
    values = [s[key] for s in per_seed.values() if s.get(key) is not None]
    if not values:
        return {"mean": None, "se": None, "values": []}
    mean, se = mean_se(values)
    return {"mean": mean, "se": se if len(values) > 1 else next(iter(per_seed.values())).get(f"{key}_se"),
            "values": values}


SEED_METRICS = ("accuracy", "chain_correct", "first_hop", "valid_cot", "wrong_distractor_share",
                "wrong_other_city_share", "wrong_no_city_share", "wrong_distractor_chance", "prompt_city_chance")


def evaluate_rows(model, tokenizer, rows: list, style: str, answers: tuple, config: dict, what: str, log) -> tuple:
    """Generate for in-context records and grade them: (summary, one prediction per row). `answers`:
    (the answer candidates, every answer a model may name); `config`: max_rows, batch_size, <style>_max_new_tokens."""
    rows = rows[:config["max_rows"]] if config["max_rows"] else rows
    prompts = [generation.prompt_text(tokenizer, r["messages"]) for r in rows]
    new_tokens = config[f"{style}_max_new_tokens"]
    check_fits(tokenizer, model, prompts, what, new_tokens)
    log.info("%s: %d questions", what, len(rows))
    generations = generation.sharded(
        lambda share: generation.generate(model, tokenizer, share, new_tokens, config["batch_size"]), prompts)
    grades = [grade_row(r, g, style, *answers) for r, g in zip(rows, generations)]
    predictions = [{"row": i, "question": r["question"], "answer": r["answer"], "bridge": r["answer_intermediate"],
                    "distractor_e3s": r["distractor_e3s"], "generation": gen, **grade}
                   for i, (r, gen, grade) in enumerate(zip(rows, generations, grades))]
    return summarise(grades), predictions


def setting(style: str, n_distractors: int, chance: float, per_seed: dict) -> dict:
    """One (style, distractors) entry of the results: its replicates and their mean +- s.e."""
    return {"style": style, "n_distractors": n_distractors, "n_facts": 2 * n_distractors + 2, "chance": chance,
            "per_seed": per_seed, **{key: over_seeds(per_seed, key) for key in SEED_METRICS}}


def evaluate_settings(model, tokenizer, world: dict, settings: list, config: dict, log) -> tuple:
    """settings: (style, n_distractors) pairs. Returns ({setting key: summary}, prediction rows)."""
    answers = world["cities"], sorted(set(world["cities"]) | set(tables.cities()))
    results, predictions = {}, []
    for style, n_distractors in settings:
        per_seed = {}
        for seed in config["data_seeds"]:
            rows = build_rows(world, n_distractors, seed, style)
            what = f"in_context {style} with {n_distractors} distractors, seed {seed}"
            per_seed[str(seed)], graded = evaluate_rows(model, tokenizer, rows, style, answers, config, what, log)
            predictions += [{"style": style, "n_distractors": n_distractors, "seed": seed, **p} for p in graded]
        results[f"{style}/{n_distractors}"] = setting(style, n_distractors, 1 / len(world["cities"]), per_seed)
    return results, predictions


def reference_answers(records: list) -> tuple:
    """(a reference file's answer candidates: its answers and every distractor's e3, every answer a model may name)."""
    candidates = sorted({r["answer"] for r in records} | {e3 for r in records for e3 in r["distractor_e3s"]})
    return candidates, sorted(set(candidates) | set(tables.cities()))


def evaluate_reference_file(model, tokenizer, path, config: dict, log) -> dict:
    """Grade one of the reference's in-context files (triplet/context/question/answer rows) in each of
    config["styles"] with the reference's prompt. Returns {path, n_rows, n_distractors, answers (the candidates),
    styles: {style: summary as in_context's per seed}, predictions}. `config` also needs in_context's max_rows,
    batch_size and <style>_max_new_tokens."""
    rows = read_reference_in_context(path)
    records = {style: as_records(rows, style) for style in config["styles"]}
    some = next(iter(records.values()))
    answers = reference_answers(some)
    result = {"path": str(path), "n_rows": len(rows), "n_distractors": statistics.mode(r["n_distractors"] for r in some),
              "answers": answers[0], "styles": {}, "predictions": []}
    for style, styled in records.items():
        what = f"{Path(path).name} {style}"
        result["styles"][style], graded = evaluate_rows(model, tokenizer, styled, style, answers, config, what, log)
        result["predictions"] += [{"file": str(path), "style": style, **p} for p in graded]
    return result


def evaluate_reference_files(model, tokenizer, paths: list, config: dict, log) -> tuple:
    """in_context's report (less the model) and predictions for reference files. Each file is one replicate,
    as the reference's three seeds are; files are grouped by style and by the distractor count of their contexts."""
    files = [evaluate_reference_file(model, tokenizer, path, config, log) for path in paths]
    answers = set().union(*(f["answers"] for f in files))
    settings = {}
    for style in config["styles"]:
        for n in sorted({f["n_distractors"] for f in files}):
            per_file = {f["path"]: f["styles"][style] for f in files if f["n_distractors"] == n}
            settings[f"{style}/{n}"] = setting(style, n, 1 / len(answers), per_file)
    report = {"files": [f["path"] for f in files], "candidates": len(answers), "settings": settings}
    return report, [p for f in files for p in f["predictions"]]


def is_main_process() -> bool:
    return PartialState(cpu=not torch.cuda.is_available()).is_main_process
