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

from runner.files import atomic_write_json
from runner.registry import Job, SubJob
from twohop.reports.layer_ordering import write_chain_report, write_comparison
from twohop.training.recipes import recipe, trained_or_given
from twohop.training.stages import LayerOrderingConfig, check_config, run_chain


def defaults(model) -> dict:
    # The training recipe is finetune's (tiny: lr 3e-3; reference: lr 1e-5, so the last stages run at 1e-6).
    return recipe(model, "synthetic")


def run(ctx, selective: bool) -> dict:
    start = trained_or_given(ctx.input("finetune_base"), ctx.model.path)
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


CHAIN = dict(config=LayerOrderingConfig, defaults=defaults, requires=("finetune_base", "generate_data_spouses"),
             uses_model=True, seeded=True, check=check_config, trains=True)
JOB = Job("layer_ordering", "staged layer-freezing intervention (Exp. 2a) and its all-layers baseline", (
    SubJob("layer_ordering", "selective", "B facts into the upper half, A facts into the lower half, then two-hop; "
           "twice, the second time at lr/10", partial(run, selective=True), **CHAIN),
    SubJob("layer_ordering", "all", "the baseline: the same six stages, every parameter trained in each",
           partial(run, selective=False), **CHAIN),
    SubJob("layer_ordering", "compare", "both chains' metrics by stage, side by side", run_compare,
           requires=("layer_ordering_selective", "layer_ordering_all"), uses_model=True, seeded=True),
))
