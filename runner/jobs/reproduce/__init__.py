"""reproduce: the paper's study in one command, ending in report.md and its Figure 1.

`reproduce_study` reads, through its prerequisites (which the runner adds and runs first):
- the fine-tuning settings in `settings` (default: separate documents = `spouses`, same document =
  `samedoc`), each trained and evaluated at every seed in `seeds`;
- the in-context setting (`in_context_nocot`, `in_context_cot`: the base model, data seeds 1-3);
- the semi-synthetic setting: `semi_synthetic_types` (a subset that fits the laptop budget), or all
  20 entity types with `--set all_entity_types=true`, at `semi_synthetic_seed`.
It writes report.md (the table, the findings checked against the paper's, per-type table),
report.json (every number with the file it came from), figure1.png (no-CoT vs CoT vs chance per
setting, with error bars), loss_gap.png and semi_synthetic/ (per-type table and plot).

With `--model` naming a real model, the same prerequisites run with the reference recipe.
"""
from runner.errors import UserError
from dataclasses import dataclass

from runner.config import option
from runner.registry import Job, SubJob
from twohop.data.tables import ENTITY_TYPES
from twohop.reports.study import write_report
from twohop.training.recipes import VARIANTS


@dataclass
class StudyConfig:
    seeds: list[int] = option([1, 2, 3], "training seeds of each fine-tuning setting")
    settings: list[str] = option(["spouses", "samedoc"], "fine-tuning variants: separate documents, same document, ...")
    semi_synthetic_types: list[str] = option(["universities"], "entity types of the semi-synthetic setting")
    all_entity_types: bool = option(False, "the semi-synthetic setting over all 20 entity types")
    semi_synthetic_seed: int = option(1, "training seed of the semi-synthetic fine-tunes")


def entity_types(config) -> tuple:
    return ENTITY_TYPES if config["all_entity_types"] else tuple(config["semi_synthetic_types"])


def requirements(config) -> list:
    seeds, semi_seed = config["seeds"], [config["semi_synthetic_seed"]]
    return ([(f"{job}_{setting}", seeds) for setting in config["settings"] for job in ("finetune", "evaluate_twohop")]
            + ["in_context_nocot", "in_context_cot"]
            + [(f"{job}_{t}", semi_seed) for t in entity_types(config) for job in ("finetune", "evaluate_twohop")])


def check_config(config, model=None) -> None:
    known = {v.name for v in VARIANTS}
    if not config["settings"] or set(config["settings"]) - known:
        raise UserError(f"settings {config['settings']!r}: expected fine-tuning variants from {sorted(known)}")
    unknown = set(config["semi_synthetic_types"]) - set(ENTITY_TYPES)
    if unknown:
        raise UserError(f"semi_synthetic_types: unknown entity type(s) {sorted(unknown)}; known: {', '.join(ENTITY_TYPES)}")
    if not config["seeds"]:
        raise UserError(f"seeds {config['seeds']!r}: expected a list of integers, e.g. [1, 2, 3]")


def run(ctx) -> dict:
    config = ctx.config
    synthetic = {setting: {seed: (ctx.input(f"finetune_{setting}", seed), ctx.input(f"evaluate_twohop_{setting}", seed))
                           for seed in config["seeds"]} for setting in config["settings"]}
    in_context = {style: ctx.input(f"in_context_{style}") for style in ("nocot", "cot")}
    semi = {t: ctx.input(f"evaluate_twohop_{t}", config["semi_synthetic_seed"]) for t in entity_types(config)}
    return write_report(ctx.run_dir, ctx.model, synthetic, in_context, semi, ctx.log)


JOB = Job("reproduce", "the whole study in one command: report.md and the paper's Figure 1", (
    SubJob("reproduce", "study", "separate documents, same document, in context and semi-synthetic; "
           "3 seeds; report.md + figure1.png", run, StudyConfig, requires=requirements, uses_model=True,
           check=check_config),
))
