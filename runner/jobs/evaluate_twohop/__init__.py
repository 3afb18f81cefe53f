"""evaluate_twohop: evaluate what a finetune sub-job trained, on its dataset's tests.

`evaluate_twohop_<x>` mirrors `finetune_<x>` (generated from the finetune registry) and requires
it: it loads `<finetune run>/model` and evaluates every test the dataset's card lists. Outputs:
results.json, predictions.jsonl, summary.md, summary.csv, accuracy.png,
loss_over_training.png (true vs shuffled loss from the finetune run's metrics) and lm_eval_tasks/ (every
evaluated test as an lm-eval task; `--set backend=lm_eval` generates through lm-eval itself); next to
the seed folders, seeds_summary.{json,md}: every headline metric as mean +- s.e. over seeds.
"""
import json
from functools import partial

from runner.registry import Job, SubJob
from runner.jobs import finetune
from runner.jobs.generate_data import tables
from runner.jobs.evaluate_twohop.evaluate import DEFAULTS, check_config, evaluate_dataset
from runner.jobs.evaluate_twohop.report import write_reports, write_semi_synthetic_report, write_seed_summary


def run(ctx, trained_by: str, data_job: str) -> dict:
    report = evaluate_dataset(ctx.input(trained_by) / "model", ctx.input(data_job) / "data", ctx.config, ctx.log,
                              ctx.run_dir)
    write_reports(report, ctx.run_dir, ctx.run.label, ctx.input(trained_by) / "metrics.jsonl")
    write_seed_summary(ctx.run_dir.parent)  # mean +- s.e. over the seeds finished so far
    return report["headline"]


def mirror(subjob) -> SubJob:
    data_job = next(r for r in subjob.requires if r.startswith("generate_data_"))
    return SubJob("evaluate_twohop", subjob.name, f"evaluate {subjob.full_name}'s model on its tests",
                  partial(run, trained_by=subjob.full_name, data_job=data_job), DEFAULTS,
                  requires=(subjob.full_name, data_job), uses_model=True, seeded=True, check=check_config)


def run_semi_synthetic_report(ctx, entity_types) -> dict:
    results = {t: json.loads((ctx.input(f"evaluate_twohop_{t}") / "results.json").read_text()) for t in entity_types}
    return write_semi_synthetic_report(results, ctx.run_dir, ctx.run.label)


ENTITY_TYPES = tuple(tables.entity_schema())
SEMI_SYNTHETIC_REPORT = SubJob(
    "evaluate_twohop", "semi_synthetic", "every entity type's evaluation in one table (sorted by no-CoT "
    "accuracy) and plot (Exp. 4)", partial(run_semi_synthetic_report, entity_types=ENTITY_TYPES), {},
    requires=tuple(f"evaluate_twohop_{t}" for t in ENTITY_TYPES), uses_model=True, seeded=True)

JOB = Job("evaluate_twohop", "evaluate fine-tuned models: CoT / no-CoT accuracy, candidates, loss gap",
          tuple(mirror(s) for s in finetune.SUBJOBS if s.seeded) + (SEMI_SYNTHETIC_REPORT,))
