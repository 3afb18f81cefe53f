"""layer_ordering: the staged layer-freezing intervention (Experiment 2a), with its real baseline.

The idea: store hop B (e2 -> e3) in the upper half of the layers and hop A (e1 -> e2) in the lower
half, then train two-hop questions, so the bridge entity is ready before the layers that hold hop B.
Six stages, each from the previous stage's saved model: B facts (upper half), A facts (lower half),
two-hop CoT + no-CoT (all layers), then the three again at a tenth of the learning rate.
`selective` trains the named halves; `all` is the baseline and trains every parameter in every
stage (the reference script froze its baseline too, and could not chain stages because it saved
nothing). `compare` puts both chains' metrics by stage side by side. The `_replay` sub-jobs run the
same three with replay (`twohop.training.stages.REPLAY_STAGES`: each stage also trains the facts its
round stored before it), so a small model's forgetting between stages does not hide the storage order.
"""
from functools import partial

from runner.files import atomic_write_json
from runner.registry import Job, SubJob
from twohop.reports.layer_ordering import write_chain_report, write_comparison
from twohop.training.recipes import recipe, trained_or_given
from twohop.training.stages import REPLAY_STAGES, STAGES, LayerOrderingConfig, check_config, run_chain


# Chains as data: sub-job suffix -> (stages, what the suffix adds to the help line).
CHAINS = {"": (STAGES, ""), "_replay": (REPLAY_STAGES, ", each stage replaying its round's earlier facts")}


def defaults(model, stages) -> dict:
    # The training recipe is finetune's (tiny: lr 3e-3; reference: lr 1e-5, so the last stages run at 1e-6).
    return {**recipe(model, "synthetic"), "stages": stages}


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


def run_compare(ctx, suffix: str) -> dict:
    chains = (f"selective{suffix}", f"all{suffix}")  # named in full, so a missing one's error names its sub-job
    return write_comparison({chain: ctx.input(f"layer_ordering_{chain}") for chain in chains}, ctx.run_dir, ctx.run.label)


def chain_subjobs(suffix: str, stages: list, adds: str) -> list:
    chain = dict(config=LayerOrderingConfig, defaults=partial(defaults, stages=stages),
                 requires=("finetune_base", "generate_data_spouses"), uses_model=True, seeded=True, check=check_config,
                 trains=True)
    return [
        SubJob("layer_ordering", f"selective{suffix}", "B facts into the upper half, A facts into the lower half, then "
               f"two-hop; twice, the second time at lr/10{adds}", partial(run, selective=True), **chain),
        SubJob("layer_ordering", f"all{suffix}", f"the baseline: the same six stages, every parameter trained in each{adds}",
               partial(run, selective=False), **chain),
        SubJob("layer_ordering", f"compare{suffix}", f"both chains' metrics by stage, side by side{adds}",
               partial(run_compare, suffix=suffix), requires=(f"layer_ordering_selective{suffix}", f"layer_ordering_all{suffix}"),
               uses_model=True, seeded=True),
    ]


JOB = Job("layer_ordering", "staged layer-freezing intervention (Exp. 2a) and its all-layers baseline, without and "
          "with replay", tuple(subjob for suffix, (stages, adds) in CHAINS.items() for subjob in chain_subjobs(suffix, stages, adds)))
