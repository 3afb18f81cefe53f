"""evaluate_twohop: evaluate what a finetune sub-job trained, on the tests its dataset's card declares.

`evaluate_twohop_<x>` mirrors `finetune_<x>` (both generated from the library's catalogue) and
requires it: it loads `<finetune run>/model` and evaluates every test of the card. Outputs:
results.json, predictions.jsonl, summary.md, summary.csv, accuracy.png, loss_over_training.png (true
vs shuffled loss from the finetune run's metrics) and lm_eval_tasks/ (every evaluated test as an
lm-eval task; `--set backend=lm_eval` generates through lm-eval itself).
`evaluate_twohop_<x>_over_seeds` reads the evaluations of the seeds in its `seeds` key (default: the
invocation's `--seeds`) and writes seeds_summary.{json,md} (every headline metric, mean +- s.e.).
`evaluate_twohop_semi_synthetic` puts every entity type in one table.
A finetune run that trained a reference experiment YAML is graded on that YAML's eval sets and
`evaluations:` block instead of the card. `evaluate_twohop_files` grades any JSONL files one brings
(`--set 'test_files=[...]'`) the same way, on `--model` or on what `--set finetune=<sub-job>` trained.
"""
import json
from dataclasses import dataclass
from functools import partial

from accelerate import PartialState

from runner.config import option
from runner.errors import UserError
from runner.registry import Job, SubJob
from twohop.data import tables
from runner.files import atomic_write_json
from twohop.evaluation.evaluate import EvaluationConfig, evaluate_before, evaluate_dataset
from twohop.evaluation.files import (collect_files, evaluate_experiment, evaluate_files, read_test_file,
                                     trained_experiment)
from twohop.reports.evaluation import write_reports, write_semi_synthetic_report, write_seeds_summary
from twohop.training.recipes import VARIANTS, trained_or_given

# (trained setting, the data it was trained on, evaluation defaults): the variants of the fully synthetic
# study, then one per entity type, whose natural facts (hop B) are also graded on the model before fine-tuning.
SETTINGS = [(v.name, "generate_data_spouses", {}) for v in VARIANTS] + \
    [(t, f"generate_data_{t}", {"also_before": ["hop_b"]}) for t in tables.ENTITY_TYPES]


@dataclass
class OverSeeds:
    seeds: list[int] = option([], "the seeds whose evaluations are summarised ([]: this invocation's --seeds)")


@dataclass
class FilesConfig(EvaluationConfig):
    test_files: list[str] = option([], "JSONL test files or folders of them (paths from the working directory)",
                                   path=True)
    finetune: str = option("", "evaluate what this finetune sub-job trained (e.g. finetune_spouses; it runs "
                               "first); '': --model as it is (the tiny model after finetune_base)")


def check_files(config: dict, model=None) -> None:
    if not config["test_files"]:
        raise UserError("test_files: give the files or folders to evaluate, e.g. --set 'test_files=[tests/]'")
    if config["finetune"] and not config["finetune"].startswith("finetune_"):
        raise UserError(f"finetune={config['finetune']}: expected a finetune sub-job, e.g. finetune_spouses")
    collect_files(config["test_files"])


def run(ctx, setting: str, data_job: str) -> dict:
    trained, data = ctx.input(f"finetune_{setting}"), ctx.input(data_job) / "data"
    experiment = trained_experiment(trained)
    if experiment:  # it trained a reference YAML: grade that YAML's tests, never our card's
        ctx.log.info("grading the tests of %s", experiment["experiment_config"])
        report = evaluate_experiment(trained / "model", experiment, data, ctx.config, ctx.log, ctx.run_dir)
    else:
        report = evaluate_dataset(trained / "model", data, ctx.config, ctx.log, ctx.run_dir)
    if ctx.config["also_before"] and not experiment:
        base = trained_or_given(ctx.input("finetune_base"), ctx.model.path)
        report["before"], headline = evaluate_before(base, data, ctx.config, ctx.log, ctx.run_dir / "before")
        report["headline"].update(headline)
        if PartialState().is_main_process:
            atomic_write_json(ctx.run_dir / "results.json", report)
    write_reports(report, ctx.run_dir, ctx.run.label, trained / "metrics.jsonl")
    return report["headline"]


def run_files(ctx) -> dict:
    finetune = ctx.config["finetune"]
    model = ctx.input(finetune) / "model" if finetune else trained_or_given(ctx.input("finetune_base"), ctx.model.path)
    report = evaluate_files(model, ctx.config["test_files"], ctx.config, ctx.log, ctx.run_dir, ctx.run.label)
    if report["tests"]:
        write_reports(report, ctx.run_dir, ctx.run.label, ctx.input(finetune) / "metrics.jsonl" if finetune else None)
    if PartialState().is_main_process:  # with the in-context files' headline, whose outputs are in in_context/
        atomic_write_json(ctx.run_dir / "results.json", report)
    return report["headline"]


def run_over_seeds(ctx, setting: str) -> dict:
    headlines = {seed: json.loads((ctx.input(f"evaluate_twohop_{setting}", seed) / "results.json").read_text())["headline"]
                 for seed in ctx.config["seeds"]}
    return write_seeds_summary(headlines, ctx.run_dir, f"evaluate_twohop_{setting} [{ctx.model.name}]")


def run_semi_synthetic_report(ctx) -> dict:
    results = {t: json.loads((ctx.input(f"evaluate_twohop_{t}") / "results.json").read_text())
               for t in tables.ENTITY_TYPES}
    return write_semi_synthetic_report(results, ctx.run_dir, ctx.run.label)


def evaluation(setting: str, data_job: str, defaults=None) -> SubJob:
    return SubJob("evaluate_twohop", setting, f"evaluate finetune_{setting}'s model on its tests",
                  partial(run, setting=setting, data_job=data_job), EvaluationConfig, defaults or {},
                  requires=(f"finetune_{setting}", data_job, "finetune_base"), uses_model=True, seeded=True)


def over_seeds(setting: str) -> SubJob:
    return SubJob("evaluate_twohop", f"{setting}_over_seeds", f"evaluate_twohop_{setting}: every headline metric "
                  "as mean +- s.e. over seeds", partial(run_over_seeds, setting=setting), OverSeeds,
                  requires=lambda config: [(f"evaluate_twohop_{setting}", config["seeds"])], uses_model=True,
                  seeds_from_cli=True)


SEMI_SYNTHETIC_REPORT = SubJob(
    "evaluate_twohop", "semi_synthetic", "every entity type's evaluation in one table (sorted by no-CoT "
    "accuracy) and plot (Exp. 4)", run_semi_synthetic_report,
    requires=tuple(f"evaluate_twohop_{t}" for t in tables.ENTITY_TYPES), uses_model=True, seeded=True)

FILES = SubJob(
    "evaluate_twohop", "files", "evaluate any JSONL test files (reference format) on --model or on what "
    "--set finetune=<finetune sub-job> trained", run_files, FilesConfig,
    requires=lambda config: ["finetune_base"] + ([config["finetune"]] if config["finetune"] else []),
    uses_model=True, seeded=True, check=check_files, named_only=True,
    external_files=lambda config, workspace: {path: read_test_file for path in collect_files(config["test_files"]).values()})

JOB = Job("evaluate_twohop", "evaluate fine-tuned models: CoT / no-CoT accuracy, candidates, loss gap",
          tuple(evaluation(*setting) for setting in SETTINGS) + tuple(over_seeds(s) for s, *_ in SETTINGS)
          + (SEMI_SYNTHETIC_REPORT, FILES))
