"""save_hidden_states: per-layer representations and the "e2 + r2 = e3" analysis.

Sub-jobs, generated per entity type:
- `<type>`: the states of every prompt family (see `prompts`) in the model `finetune_base` made
  (the tiny model after its pretraining, which taught it the entities' facts; a real model as is),
  one states folder per family (`twohop.interp.hidden_states` format: shards + rows.jsonl + metadata).
- `analysis_<type>` and `analysis_all`: similarity by layer, its correlation with the two-hop no-CoT
  accuracy `evaluate_twohop_<type>` measured, and a logit lens on the fine-tuned model.
- `prompts`: any prompt file (JSONL rows with `messages` or `prompt`) through the same saver.
"""
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np

from models import load_model
from runner.config import option
from runner.errors import UserError
from runner.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from runner.progress import item_bar
from runner.registry import Job, SubJob
from twohop.data import tables
from twohop.data.records import read_prompts, read_records
from twohop.evaluation import generation
from twohop.interp import similarity
from twohop.interp.hidden_states import HiddenStates, save_hidden_states
from twohop.interp.prompt_families import FAMILIES, family_rows
from twohop.reports import hidden_states as report
from twohop.training.recipes import trained_or_given

Position = Literal["last", "span"]
DType = Literal["float32", "float16", "bfloat16"]


@dataclass
class SaveConfig:
    families: list[Literal[FAMILIES]] = option(list(FAMILIES), "prompt families whose states are saved")
    positions: list[Position] = option(["last", "span"], "last prompt token and/or the last token of the row's span")
    batch_size: int = option(32, "prompts per forward pass", minimum=1)
    shard_rows: int = option(512, "rows per safetensors shard (a killed run resumes after its last shard)", minimum=1)
    dtype: DType = option("float32", "dtype the states are stored in")
    fewshot_prompts: int = option(10, "e2_r2: few-shot prompts averaged per row", minimum=1)
    fewshot_shots: int = option(10, "e2_r2: demonstrations per prompt", minimum=1)
    e3_output_phrasings: int = option(3, "e3_output: question phrasings averaged per row", minimum=1)


@dataclass
class PromptsConfig:
    prompts_file: str = option("", "JSONL rows with 'messages' (a chat) or 'prompt' (raw text)", path=True)
    span_field: str = option("", "the row field whose last token is the 'span' position")
    positions: list[Position] = option(["last"], "last prompt token and/or the last token of span_field")
    batch_size: int = option(32, "prompts per forward pass", minimum=1)
    shard_rows: int = option(512, "rows per safetensors shard", minimum=1)
    dtype: DType = option("float32", "dtype the states are stored in")


@dataclass
class AnalysisConfig:
    pairs: list[list[str]] = option([["e2_r2", "e3_tell"], ["e2_r2", "e3_output"], ["e2_tell", "e3_tell"]],
                                    "family pairs [source, target] compared per layer")
    permutations: int = option(10000, "permutations of the correlation's p-value", minimum=1)
    scatter_layer: int = option(-1, "layer of the similarity-vs-accuracy scatter (-1: the middle one)", minimum=-1)
    batch_size: int = option(32, "prompts per forward pass of the logit lens", minimum=1)


def check_saving(config: dict, model=None) -> None:
    if not config["positions"]:
        raise UserError("positions: empty; give last and/or span")


def check_prompts(config: dict, model=None) -> None:
    check_saving(config)
    if not config["prompts_file"]:
        raise UserError("prompts_file: set it to a JSONL of rows with 'messages' or 'prompt', e.g. --set prompts_file=p.jsonl")
    if not Path(config["prompts_file"]).is_file():
        raise UserError(f"prompts_file {config['prompts_file']}: no such file")


def check_analysis(config: dict, model=None) -> None:
    for pair in config["pairs"]:
        if len(pair) != 2 or set(pair) - set(FAMILIES):
            raise UserError(f"pairs: {pair!r} is not [source, target] of the families {', '.join(FAMILIES)}")


def base_path(ctx) -> Path:
    return trained_or_given(ctx.input("finetune_base"), ctx.model.path)


def run_save(ctx, entity_type: str) -> dict:
    model_path = base_path(ctx)
    model, tokenizer = load_model(model_path)
    saved = {}
    for family in ctx.config["families"]:
        rows = family_rows(family, entity_type, tokenizer, ctx.config)
        ctx.log.info("%s: %d rows, %d prompts", family, len(rows), sum(len(r["prompts"]) for r in rows))
        info = save_hidden_states(model, tokenizer, rows, ctx.run_dir / family, ctx.config["positions"],
                                  ctx.config["batch_size"], ctx.config["shard_rows"], ctx.config["dtype"],
                                  {"model": str(model_path), "family": family, "entity_type": entity_type},
                                  item_bar(family, "row"))
        saved[family] = info["rows"]
    return {"rows": saved}


def run_prompts(ctx) -> dict:
    path = Path(ctx.config["prompts_file"])
    model, tokenizer = load_model(base_path(ctx))
    rows = []
    for i, row in enumerate(read_prompts(path)):
        if "messages" in row:
            text = generation.prompt_text(tokenizer, row["messages"])
        else:
            text = (tokenizer.bos_token or "") + row["prompt"]
        fields = {k: v for k, v in row.items() if k not in ("messages", "prompt")}
        span = row.get(ctx.config["span_field"], "") if ctx.config["span_field"] else ""
        rows.append({"id": row.get("id", i), **fields, "span": span, "prompts": [text]})
    info = save_hidden_states(model, tokenizer, rows, ctx.run_dir / "states", ctx.config["positions"],
                              ctx.config["batch_size"], ctx.config["shard_rows"], ctx.config["dtype"],
                              {"model": str(base_path(ctx)), "family": "prompts", "source": str(path)},
                              item_bar("prompts", "row"))
    return {"rows": info["rows"]}


def load_analysis_inputs(ctx, entity_types) -> tuple:
    """(states by (type, family), no-CoT accuracy by type/attribute, logit-lens ranks, the last model)."""
    states, accuracy, lens_ranks = {}, {}, []
    for entity_type in entity_types:
        folder = ctx.input(f"save_hidden_states_{entity_type}")
        for family in {f for pair in ctx.config["pairs"] for f in pair}:
            if not (folder / family / "metadata.json").is_file():
                raise UserError(f"pairs: family {family!r} was not saved by save_hidden_states_{entity_type}; "
                                f"add it to that sub-job's families or drop the pair")
            states[(entity_type, family)] = HiddenStates(folder / family)
        results = json.loads((ctx.input(f"evaluate_twohop_{entity_type}") / "results.json").read_text())
        accuracy.update(similarity.nocot_accuracy(results, entity_type))
        # The logit lens reads the fine-tuned model: only it knows the fictional people's favorites.
        data = ctx.input(f"generate_data_{entity_type}") / "data"
        card = json.loads((data / "card.json").read_text())
        rows = [r for name, spec in card["tests"].items() if spec["kind"] == "two_hop" and spec["style"] == "nocot"
                and not spec["shuffled_of"] for r in read_records(data / f"{name}.jsonl")]
        model, tokenizer = load_model(ctx.input(f"finetune_{entity_type}") / "model")
        lens_ranks.append(similarity.logit_lens_ranks(model, tokenizer, rows, ctx.config["batch_size"]))
    return states, accuracy, np.concatenate(lens_ranks, axis=1), model


def run_analysis(ctx, entity_types) -> dict:
    config = ctx.config
    states, accuracy, ranks, model = load_analysis_inputs(ctx, entity_types)
    n_layers = next(iter(states.values())).metadata["layers"]
    scatter_layer = n_layers // 2 if config["scatter_layer"] < 0 else config["scatter_layer"]
    if not 0 <= scatter_layer < n_layers:
        raise UserError(f"scatter_layer {scatter_layer}: the states have layers 0..{n_layers - 1}")
    attributes = {t: tables.entity_table(t)[0]["attributes"] for t in entity_types}
    pairs = {f"{source}->{target}": {"by_layer": similarity.pair_by_layer(states, source, target, n_layers, attributes,
                                                                          accuracy, config["permutations"])}
             for source, target in config["pairs"]}
    lens = similarity.lens_summary(ranks, int(model.config.vocab_size))
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
                  AnalysisConfig, requires=requires, uses_model=True, seeded=True, project_data=tables.SHIPPED_DATA,
                  check=check_analysis)


ENTITY_TYPES = tables.ENTITY_TYPES
JOB = Job("save_hidden_states", "per-layer hidden states and the 'e2 + r2 = e3' analysis", tuple(
    [SubJob("save_hidden_states", t, f"hidden states of every prompt family for {t}", partial(run_save, entity_type=t),
            SaveConfig, requires=("finetune_base",), uses_model=True, check=check_saving,
            project_data=tables.SHIPPED_DATA)
     for t in ENTITY_TYPES]
    + [analysis_subjob(f"analysis_{t}", (t,), f"similarity vs no-CoT accuracy and logit lens for {t}")
       for t in ENTITY_TYPES]
    + [analysis_subjob("analysis_all", ENTITY_TYPES, "the analysis across all entity types, with type means"),
       SubJob("save_hidden_states", "prompts", "hidden states of any prompt file (--set prompts_file=...)",
              run_prompts, PromptsConfig, requires=("finetune_base",), uses_model=True, check=check_prompts,
              external_files=lambda config, workspace: {Path(config["prompts_file"]): read_prompts})]))
