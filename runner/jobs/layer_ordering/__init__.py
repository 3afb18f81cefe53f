"""layer_ordering: the staged layer-freezing intervention (Experiment 2a), with its real baseline.

The idea: store hop B (e2 -> e3) in the upper half of the layers and hop A (e1 -> e2) in the lower
half, then train two-hop questions, so the bridge entity is ready before the layers that hold hop B.
Six stages, each from the previous stage's saved model: B facts (upper half), A facts (lower half),
two-hop CoT + no-CoT (all layers), then the three again at a tenth of the learning rate.
`selective` trains the named halves; `all` is the baseline and trains every parameter in every
stage (the reference script froze its baseline too, and could not chain stages because it saved
nothing). `compare` puts both chains' metrics by stage side by side.
"""
from functools import partial

from runner.errors import UserError
from runner.files import atomic_write_json
from runner.registry import Job, SubJob
from runner.jobs.evaluate_twohop.evaluate import DEFAULTS as EVALUATION_DEFAULTS
from runner.jobs.finetune import base_model_path, training_defaults
from runner.jobs.layer_ordering.chain import check_stages, run_chain
from runner.jobs.layer_ordering.report import write_chain_report, write_comparison

ATOMIC_B, ATOMIC_A = ["train/b_demoed", "train/b_undemoed"], ["train/a_demoed", "train/a_undemoed"]
TWO_HOP = ["train/2hop_cot", "train/2hop_nocot"]
STAGES = [
    {"name": "b_facts", "train": ATOMIC_B, "layers": "upper", "lr_scale": 1.0},
    {"name": "a_facts", "train": ATOMIC_A, "layers": "lower", "lr_scale": 1.0},
    {"name": "two_hop", "train": TWO_HOP, "layers": "all", "lr_scale": 1.0},
    {"name": "b_facts_again", "train": ATOMIC_B, "layers": "upper", "lr_scale": 0.1},
    {"name": "a_facts_again", "train": ATOMIC_A, "layers": "lower", "lr_scale": 0.1},
    {"name": "two_hop_again", "train": TWO_HOP, "layers": "all", "lr_scale": 0.1},
]
# After each stage: the held-out atomic tests and the two-hop tests, a small memorisation check, and
# candidate-set scoring over the cities only (scoring every spouse per hop-A question would triple
# the time; hop A is graded on generations), so six evaluations cost about one evaluate_twohop run.
EVALUATION = {**EVALUATION_DEFAULTS, "skip_tests": ["in_context", "couples", "_demoed"], "memorisation_rows": 50,
              "candidate_sets": ["cities"], "bootstrap": 500}


def defaults(model) -> dict:
    # The training recipe is finetune's (tiny: lr 3e-3; reference: lr 1e-5, so the last stages run at 1e-6).
    return {**training_defaults(model, "synthetic"), "stages": STAGES, "split_layer": -1,
            "delete_finished_weights": False, "evaluation": EVALUATION}


def check_config(config: dict) -> None:
    from runner.jobs.finetune import check_training_config
    check_training_config({**config, "layer_range": ""})
    check_stages(config["stages"])
    if not isinstance(config["split_layer"], int) or config["split_layer"] == 0 or config["split_layer"] < -1:
        raise UserError(f"split_layer {config['split_layer']!r}: expected -1 (half the layers) or a layer index >= 1")


def run(ctx, selective: bool) -> dict:
    start = base_model_path(ctx)
    ctx.log.info("%s chain of %d stages from %s", "selective" if selective else "all-layers",
                 len(ctx.config["stages"]), start)
    records = run_chain(start, ctx.input("generate_data_spouses") / "data", ctx.config, selective, ctx.seed,
                        ctx.run_dir, ctx.log)
    atomic_write_json(ctx.run_dir / "stages.json", records)
    write_chain_report(records, ctx.run_dir, ctx.run.label)
    last = records[-1]["metrics"]
    return {key: last[key] for key in ("acc_a", "acc_b", "acc_2hop_cot_chain", "acc_2hop_nocot", "loss_gap") if key in last}


def run_compare(ctx) -> dict:
    return write_comparison({mode: ctx.input(f"layer_ordering_{mode}") for mode in ("selective", "all")},
                            ctx.run_dir, ctx.run.label)


CHAIN = dict(requires=("finetune_base", "generate_data_spouses"), uses_model=True, seeded=True, check=check_config)
JOB = Job("layer_ordering", "staged layer-freezing intervention (Exp. 2a) and its all-layers baseline", (
    SubJob("layer_ordering", "selective", "B facts into the upper half, A facts into the lower half, then two-hop; "
           "twice, the second time at lr/10", partial(run, selective=True), defaults, **CHAIN),
    SubJob("layer_ordering", "all", "the baseline: the same six stages, every parameter trained in each",
           partial(run, selective=False), defaults, **CHAIN),
    SubJob("layer_ordering", "compare", "both chains' metrics by stage, side by side", run_compare, {},
           requires=("layer_ordering_selective", "layer_ordering_all"), uses_model=True, seeded=True),
))
