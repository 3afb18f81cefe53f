"""Evaluate test files one brings (the reference repo's test folders, a reference experiment's eval sets,
one's own JSONL) with the card evaluator, so they are graded, scored against candidates, loss-gapped,
reported and exported to lm-eval exactly as our generated tests are: no second evaluator.

A card is synthesised for the files. Each file is a test named by its path below the files' common
folder (or, for an experiment, by its eval set's name). Its style is what its system prompt asks
(reasoning step by step: cot; answering directly: nocot) or else what its name says (`X_cot`, `X_nocot`,
`X_no_cot`; the reference's plain `X.jsonl` is no-CoT). Its kind is two_hop when its rows name a bridge
(`answer_intermediate`) or its name says so (the reference's `2hop_*`), and atomic otherwise; without a bridge the first-hop grades are not applicable
(None). `X_shuffled.jsonl` given together with `X.jsonl` is X's chance baseline (the loss gap). The
candidate set of a group (X, X_cot, X_shuffled) is every answer its files give. A file of a dataset we
generated keeps what its card declares (kind, style, headline metric, candidate set).
"""
import json
import os
import re
from pathlib import Path

from runner import config as typed
from runner.errors import UserError
from twohop.data import tables
from models import load_model
from twohop.data.records import read_records
from twohop.data.reference_in_context import is_reference_in_context, read_reference_in_context
from twohop.evaluation import grading
from twohop.evaluation.evaluate import EvaluationConfig, evaluate_dataset
from twohop.evaluation.in_context import evaluate_reference_files, is_main_process
from twohop.reports.in_context import in_context_headline, write_in_context_outputs

NOCOT_PROMPT = re.compile(r"\b(do not|don't|without|no)\b[^.]*\b(reason|explain|think)|\b(immediately|directly)\b",
                          re.IGNORECASE)
COT_PROMPT = re.compile(r"step[ -]by[ -]step|explain your reasoning|think (it )?through", re.IGNORECASE)
GROUP_SUFFIX = re.compile(r"(_shuffled|_no_?cot|_cot)+$")


def style_of(rows: list, name: str) -> str:
    """cot or nocot: what the first row's system prompt asks for, else what the file's name says."""
    system = next((m["content"] for m in rows[0]["messages"] if m["role"] == "system"), "")
    if NOCOT_PROMPT.search(system):
        return "nocot"
    if COT_PROMPT.search(system):
        return "cot"
    words = re.split(r"[^a-z0-9]+", Path(name).name.lower())
    negated = "nocot" in words or ("no", "cot") in set(zip(words, words[1:]))
    return "cot" if "cot" in words and not negated else "nocot"


def collect_files(paths) -> dict:
    """name -> path of every JSONL file given (folders searched recursively), each named by its path below
    the files' common folder, without `.jsonl`."""
    found = []
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise UserError(f"test_files: {given} does not exist")
        found += sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]
    found = list(dict.fromkeys(p.resolve() for p in found))
    if not found:
        raise UserError(f"test_files: no .jsonl file in {', '.join(map(str, paths)) or '(nothing given)'}")
    root = Path(os.path.commonpath([p.parent for p in found]))
    return {str(p.relative_to(root).with_suffix("")): p for p in found}


def declared(path: Path) -> tuple:
    """(spec, candidate set) of a file that a generated dataset's card.json above it declares, else (None, [])."""
    for folder in path.resolve().parents:
        if (folder / "card.json").is_file():
            card = json.loads((folder / "card.json").read_text())
            spec = card.get("tests", {}).get(str(path.resolve().relative_to(folder).with_suffix("")))
            return (spec, card["candidate_sets"][spec["candidate_set"]]) if spec else (None, [])
    return None, []


TWO_HOP_NAME = re.compile(r"2hop|two_hop", re.IGNORECASE)  # the reference's semi-synthetic tests may leave the bridge ""


def files_card(files: dict, dataset: str, shuffled_of: dict = None, overrides: dict = None) -> dict:
    """A card for `files` (test name -> path); `shuffled_of` maps a shuffled set to its true set's name
    (default: `X_shuffled` to `X` where both are given); `overrides` (test name -> spec keys) wins."""
    if shuffled_of is None:
        shuffled_of = {name: name.removesuffix("_shuffled") for name in files
                       if name.endswith("_shuffled") and name.removesuffix("_shuffled") in files}
    tests, answers = {}, {}
    one_group = len({GROUP_SUFFIX.sub("", name) for name in files}) == 1  # the headline's plain names then
    for name, path in files.items():
        rows = read_records(path, required=("messages", "answer"))
        group = GROUP_SUFFIX.sub("", name).replace("/", "_")
        two_hop = TWO_HOP_NAME.search(Path(name).name) is not None or \
            any(grading.split_aliases(r.get("answer_intermediate"))[0] for r in rows)
        tests[name] = {"kind": "two_hop" if two_hop else "atomic", "style": style_of(rows, name),
                       "candidate_set": group, "attribute": group, "shuffled_of": shuffled_of.get(name, ""),
                       "metric": "" if two_hop else f"acc_{name.replace('/', '_')}"}
        spec, candidates = declared(Path(path))
        if spec:  # a file of a dataset we generated: what its card says
            tests[name].update({key: spec[key] for key in ("kind", "style", "metric", "attribute")})
        elif one_group:  # acc_2hop_nocot, loss_gap
            tests[name]["attribute"] = ""
        answers.setdefault(group, set()).update(candidates or (grading.split_aliases(r["answer"])[0] for r in rows))
        tests[name].update((overrides or {}).get(name, {}))
    return {"dataset": dataset, "source": f"the files {', '.join(map(str, files.values()))}", "tests": tests,
            "candidate_sets": {group: sorted(found) for group, found in answers.items()},
            "paths": {name: str(path) for name, path in files.items()}}


def in_context_layout(path) -> bool:
    """Whether a file's first row is in the reference's in-context layout (triplet/context/question/answer)."""
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        return is_reference_in_context(json.loads(first))
    except json.JSONDecodeError:
        return False  # read_records names the bad line


def read_test_file(path) -> list:
    """A given test file read (and checked row by row) in its layout: records, or reference in-context rows."""
    return read_reference_in_context(path) if in_context_layout(path) else read_records(path)


def evaluate_files(model_path, paths, config, log, run_dir, title: str = "files") -> dict:
    """Every JSONL file under `paths` evaluated on the model at `model_path`, into `run_dir`. Files in the
    reference's in-context layout are graded no-CoT and CoT with its prompt, as `in_context` grades them,
    into `run_dir/in_context/`; their accuracies join the headline."""
    files = collect_files(paths)
    in_context = {name: path for name, path in files.items() if in_context_layout(path)}
    records = {name: path for name, path in files.items() if name not in in_context}
    log.info("evaluating %d given file(s): %s", len(files), ", ".join(files))
    report = evaluate_dataset(model_path, None, config, log, run_dir, card=files_card(records, "files")) \
        if records else {"tests": {}, "headline": {}, "loss_gaps": {}}
    if in_context:
        report["in_context"] = evaluate_in_context_files(model_path, list(in_context.values()), config, log,
                                                         run_dir / "in_context", title)
        report["headline"].update(report["in_context"]["headline"])
    return report


def evaluate_in_context_files(model_path, paths: list, config: dict, log, run_dir: Path, title: str) -> dict:
    """The reference's in-context files, no-CoT and CoT, with in_context's outputs in `run_dir`."""
    model, tokenizer = load_model(model_path)
    settings = {**config, "styles": ["nocot", "cot"]}
    report, predictions = evaluate_reference_files(model, tokenizer, paths, settings, log)
    report = {"model": str(model_path), **report}
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        write_in_context_outputs(report, predictions, run_dir, f"{title}: reference in-context files")
    return {"headline": {f"in_context_{k}": v for k, v in in_context_headline(report).items()}, "files": report["files"]}


def trained_experiment(finetune_dir: Path):
    """The resolved config of a finetune run that trained a reference experiment YAML, or None."""
    trained = json.loads((Path(finetune_dir) / "config.json").read_text())["config"]
    return trained if trained.get("experiment_config") else None


def evaluation_spec(entry: dict, data_dir) -> dict:
    """What one entry of a reference `evaluations:` block sets on its test: `force_cot` / `force_no_cot` ask
    with the study's CoT / no-CoT system prompt (and grade that style), a few-shot file's rows come first,
    its own generation length and first rows, and its metric name in the headline."""
    spec = {"metric": entry["metric_name"], "max_new_tokens": entry["max_new_tokens"], "rows": entry["subsample"],
            "fewshot_file": str(Path(data_dir) / entry["few_shots_path"]) if entry["few_shots_path"] else ""}
    style = "cot" if entry["force_cot"] else "nocot" if entry["force_no_cot"] else ""
    if style:
        spec.update(style=style, system=tables.templates("system_prompts")[style])
    return spec


def experiment_card(experiment: dict, data_dir) -> dict:
    """One card for a reference experiment: its eval sets (by name, each file whole; `X_shuffled` the
    baseline of `X`) and its `evaluations:` block (by metric name). Relative files are the data folder's."""
    entries, evaluations = experiment["eval_datasets"], experiment["evaluations"]
    clash = {e["name"] for e in entries} & {e["metric_name"] for e in evaluations}
    if clash:
        raise UserError(f"{experiment['experiment_config']}: {sorted(clash)} name both an eval set and an evaluation")
    files = {e["name"]: Path(data_dir) / e["dataset_file"] for e in entries}  # an absolute path stays as it is
    files.update({e["metric_name"]: Path(data_dir) / e["dataset_file"] for e in evaluations})
    return files_card(files, Path(experiment["experiment_config"] or "evaluations").stem,
                      {e["name"]: e["shuffled_of"] for e in entries if e["shuffled_of"]},
                      {e["metric_name"]: evaluation_spec(e, data_dir) for e in evaluations})


def evaluate_experiment(model_path, experiment: dict, data_dir, config, log, run_dir) -> dict:
    """A reference experiment's own tests (`experiment_card`), never our generated ones, into `run_dir`."""
    if not experiment["eval_datasets"] and not experiment["evaluations"]:
        raise UserError(f"{experiment['experiment_config']} names no eval_datasets and no evaluations to grade")
    return evaluate_dataset(model_path, data_dir, config, log, run_dir, card=experiment_card(experiment, data_dir))


def evaluate_block(model_path, evaluations: list, data_dir, log, run_dir) -> dict:
    """A finetune's `evaluations:` block alone, after training, into `run_dir`: {metric name: its accuracy,
    s.e., n, style and file}."""
    card = experiment_card({"eval_datasets": [], "evaluations": evaluations, "experiment_config": ""}, data_dir)
    report = evaluate_dataset(model_path, data_dir, typed.defaults(EvaluationConfig), log, run_dir, card=card)
    return {name: {"accuracy": s["correct"], "se": s["correct_se"], "n": s["n"], "style": s["style"],
                   "file": card["paths"][name]} for name, s in report["tests"].items()}
