"""save_hidden_states: per-layer representations and the "e2 + r2 = e3" analysis.

Sub-jobs, generated per entity type:
- `<type>`: the states of every prompt family (see `prompts`) in the model `finetune_base` made
  (the tiny model after its pretraining, which taught it the entities' facts; a real model as is),
  one states folder per family (`runner.hidden_states` format: shards + rows.jsonl + metadata).
- `analysis_<type>` and `analysis_all`: similarity by layer, its correlation with the two-hop no-CoT
  accuracy `evaluate_twohop_<type>` measured, and a logit lens on the fine-tuned model.
- `prompts`: any prompt file (JSONL rows with `messages` or `prompt`) through the same saver.
"""
import json
from functools import partial
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from models import load_model
from runner import evaluation
from runner.errors import UserError
from runner.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from runner.hidden_states import DTYPES, HiddenStates, save_hidden_states
from runner.records import read_records
from runner.registry import Job, SubJob
from runner.jobs.finetune import base_model_path
from runner.jobs.generate_data import tables
from runner.jobs.save_hidden_states import analysis, report
from runner.jobs.save_hidden_states.prompts import FAMILIES, family_rows

SAVING = {"positions": ["last", "span"], "batch_size": 32, "shard_rows": 512, "dtype": "float32"}
SAVE_DEFAULTS = {**SAVING, "families": list(FAMILIES), "fewshot_prompts": 10, "fewshot_shots": 10,
                 "e3_output_phrasings": 3}
PROMPTS_DEFAULTS = {**SAVING, "positions": ["last"], "prompts_file": "", "span_field": ""}  # "span" needs span_field
ANALYSIS_DEFAULTS = {"pairs": [["e2_r2", "e3_tell"], ["e2_r2", "e3_output"], ["e2_tell", "e3_tell"]],
                     "permutations": 10000, "scatter_layer": -1, "batch_size": 32}


def check_saving(config: dict) -> None:
    if config["dtype"] not in DTYPES:
        raise UserError(f"dtype {config['dtype']!r}: expected one of {', '.join(DTYPES)}")
    if not config["positions"] or set(config["positions"]) - {"last", "span"}:
        raise UserError(f"positions {config['positions']!r}: expected a list of 'last' and/or 'span'")
    unknown = set(config.get("families", [])) - set(FAMILIES)
    if unknown:
        raise UserError(f"families {sorted(unknown)}: unknown; choose from {', '.join(FAMILIES)}")


def check_prompts(config: dict) -> None:
    check_saving(config)
    if not config["prompts_file"]:
        raise UserError("prompts_file: set it to a JSONL of rows with 'messages' or 'prompt', e.g. --set prompts_file=p.jsonl")
    if not Path(config["prompts_file"]).expanduser().is_file():
        raise UserError(f"prompts_file {config['prompts_file']}: no such file")


def progress_bar(label: str):
    bar = tqdm(desc=label, unit="row", dynamic_ncols=True)

    def update(done, total):
        bar.total = total
        bar.update(done - bar.n)
        if done == total:
            bar.close()
    return update


def run_save(ctx, entity_type: str) -> dict:
    model_path = base_model_path(ctx)
    model, tokenizer = load_model(model_path)
    saved = {}
    for family in ctx.config["families"]:
        rows = family_rows(family, entity_type, tokenizer, ctx.config)
        ctx.log.info("%s: %d rows, %d prompts", family, len(rows), sum(len(r["prompts"]) for r in rows))
        info = save_hidden_states(model, tokenizer, rows, ctx.run_dir / family, ctx.config["positions"],
                                  ctx.config["batch_size"], ctx.config["shard_rows"], ctx.config["dtype"],
                                  {"model": str(model_path), "family": family, "entity_type": entity_type},
                                  progress_bar(family))
        saved[family] = info["rows"]
    return {"rows": saved}


def run_prompts(ctx) -> dict:
    path = Path(ctx.config["prompts_file"]).expanduser()
    model, tokenizer = load_model(base_model_path(ctx))
    rows = []
    for i, row in enumerate(read_records(path, required=())):
        if "messages" in row:
            text = evaluation.prompt_text(tokenizer, row["messages"])
        elif "prompt" in row:
            text = (tokenizer.bos_token or "") + row["prompt"]
        else:
            raise UserError(f"{path} line {i + 1}: needs 'messages' (a chat) or 'prompt' (raw text)")
        fields = {k: v for k, v in row.items() if k not in ("messages", "prompt")}
        span = row.get(ctx.config["span_field"], "") if ctx.config["span_field"] else ""
        rows.append({"id": row.get("id", i), **fields, "span": span, "prompts": [text]})
    info = save_hidden_states(model, tokenizer, rows, ctx.run_dir / "states", ctx.config["positions"],
                              ctx.config["batch_size"], ctx.config["shard_rows"], ctx.config["dtype"],
                              {"model": str(base_model_path(ctx)), "family": "prompts", "source": str(path)},
                              progress_bar("prompts"))
    return {"rows": info["rows"]}


def nocot_accuracy(results_file: Path, entity_type: str) -> dict:
    tests = json.loads(results_file.read_text())["tests"]
    return {f"{entity_type}/{test[len('test/'):-len('_nocot')]}": summary["correct"]
            for test, summary in tests.items() if test.startswith("test/") and test.endswith("_nocot")}


def run_analysis(ctx, entity_types) -> dict:
    config = ctx.config
    accuracy, lens_ranks = {}, []
    states = {}  # (type, family) -> HiddenStates
    for entity_type in entity_types:
        folder = ctx.input(f"save_hidden_states_{entity_type}")
        for pair in config["pairs"]:
            for family in pair:
                if not (folder / family / "metadata.json").is_file():
                    raise UserError(f"pairs: family {family!r} was not saved by save_hidden_states_{entity_type}; "
                                    f"add it to that sub-job's families or drop the pair")
                states.setdefault((entity_type, family), HiddenStates(folder / family))
        accuracy.update(nocot_accuracy(ctx.input(f"evaluate_twohop_{entity_type}") / "results.json", entity_type))
        # The logit lens reads the fine-tuned model: only it knows the fictional people's favorites.
        data = ctx.input(f"generate_data_{entity_type}") / "data"
        card = json.loads((data / "card.json").read_text())
        rows = [r for attribute in card["attributes"] for r in read_records(data / f"test/{attribute}_nocot.jsonl")]
        model, tokenizer = load_model(ctx.input(f"finetune_{entity_type}") / "model")
        lens_ranks.append(analysis.logit_lens_ranks(model, tokenizer, rows, config["batch_size"]))
    n_layers = next(iter(states.values())).metadata["layers"]
    scatter_layer = n_layers // 2 if config["scatter_layer"] < 0 else config["scatter_layer"]
    if not 0 <= scatter_layer < n_layers:
        raise UserError(f"scatter_layer {scatter_layer}: the states have layers 0..{n_layers - 1}")

    pairs = {}
    for source, target in config["pairs"]:
        by_layer = []
        for layer in range(n_layers):
            by_attribute = {}
            for entity_type in entity_types:
                attributes = tables.entity_table(entity_type)[0]["attributes"]
                sims = analysis.pair_similarity(states[(entity_type, source)], states[(entity_type, target)], layer,
                                                attributes)
                by_attribute.update({f"{entity_type}/{a}": s for a, s in sims.items()})
            keys = [k for k in accuracy if k in by_attribute]
            matched = [by_attribute[k]["matched"] for k in keys]
            excess = [by_attribute[k]["matched"] - by_attribute[k]["mismatched"] for k in keys]
            acc = [accuracy[k] for k in keys]
            row = {"layer": layer, "matched": float(np.mean(matched)),
                   "mismatched": float(np.nanmean([by_attribute[k]["mismatched"] for k in keys])),
                   "by_attribute": by_attribute,
                   "corr_matched": analysis.correlation(matched, acc, config["permutations"]),
                   "corr_excess": analysis.correlation(excess, acc, config["permutations"])}
            if len(entity_types) > 2:  # does the entity type alone explain it? correlate the type means
                means = {t: [(m, a) for k, m, a in zip(keys, matched, acc) if k.startswith(f"{t}/")] for t in entity_types}
                row["corr_type_means"] = analysis.correlation([np.mean([m for m, _ in v]) for v in means.values()],
                                                              [np.mean([a for _, a in v]) for v in means.values()],
                                                              config["permutations"])
            by_layer.append(row)
        pairs[f"{source}->{target}"] = {"by_layer": by_layer}

    ranks = np.concatenate(lens_ranks, axis=1)
    vocab = int(model.config.vocab_size)
    lens = {"n": int(ranks.shape[1]), "vocab": vocab, "by_layer": [
        {"layer": layer, "median_rank": float(np.median(r)), "mean_rank": float(np.mean(r)),
         "top1": float(np.mean(r == 0)), "top10": float(np.mean(r < 10))} for layer, r in enumerate(ranks)]}
    result = {"entity_types": list(entity_types), "layers": n_layers, "scatter_layer": scatter_layer,
              "accuracy": accuracy, "pairs": pairs, "logit_lens": lens}
    atomic_write_json(ctx.run_dir / "analysis.json", result)
    atomic_write_text(ctx.run_dir / "analysis.md", report.analysis_markdown(result, ctx.run.label))
    atomic_write_bytes(ctx.run_dir / "similarity_by_layer.png", report.similarity_plot(result, ctx.run.label))
    atomic_write_bytes(ctx.run_dir / "similarity_vs_accuracy.png", report.scatter_plot(result, ctx.run.label))
    atomic_write_bytes(ctx.run_dir / "logit_lens.png", report.logit_lens_plot(ranks, ctx.run.label))
    primary = pairs[f"{config['pairs'][0][0]}->{config['pairs'][0][1]}"]["by_layer"][scatter_layer]
    return {"scatter_layer": scatter_layer, "matched": primary["matched"], "mismatched": primary["mismatched"],
            "rho": primary["corr_matched"]["rho"], "p": primary["corr_matched"]["p"],
            "bridge_top10_best_layer": max(r["top10"] for r in lens["by_layer"])}


def analysis_subjob(name: str, entity_types: tuple, help: str) -> SubJob:
    requires = tuple(f"{job}_{t}" for t in entity_types
                     for job in ("save_hidden_states", "evaluate_twohop", "finetune", "generate_data"))
    return SubJob("save_hidden_states", name, help, partial(run_analysis, entity_types=entity_types),
                  ANALYSIS_DEFAULTS, requires=requires, uses_model=True, seeded=True, project_data=("datasets",))


ENTITY_TYPES = tuple(tables.entity_schema())
JOB = Job("save_hidden_states", "per-layer hidden states and the 'e2 + r2 = e3' analysis", tuple(
    [SubJob("save_hidden_states", t, f"hidden states of every prompt family for {t}", partial(run_save, entity_type=t),
            SAVE_DEFAULTS, requires=("finetune_base",), uses_model=True, check=check_saving, project_data=("datasets",))
     for t in ENTITY_TYPES]
    + [analysis_subjob(f"analysis_{t}", (t,), f"similarity vs no-CoT accuracy and logit lens for {t}")
       for t in ENTITY_TYPES]
    + [analysis_subjob("analysis_all", ENTITY_TYPES, "the analysis across all entity types, with type means"),
       SubJob("save_hidden_states", "prompts", "hidden states of any prompt file (--set prompts_file=...)",
              run_prompts, PROMPTS_DEFAULTS, requires=("finetune_base",), uses_model=True, check=check_prompts)]))
