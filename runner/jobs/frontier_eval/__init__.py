"""frontier_eval: real two-hop facts asked of local and API models, robust and cheap to rerun.

- `frontier_eval_local`: the `--model` (default: the embedded tiny model after `finetune_base`), so
  the job runs on a fresh machine with no keys.
- `frontier_eval_api`: every entry of `endpoints` (`{backend: openai|anthropic, model, base_url,
  api_key_env}`); keys are read from the named environment variables only.

Per model: `<model>/results.json` and `<model>/questions.jsonl` (every question, its reply or its
failure reason); across the sub-job's models: summary.md, summary.csv and cot_vs_nocot.png.
Replies (and model-grader verdicts) are cached in `W/experiments/frontier_eval/cache/`, so a rerun
or a resumed crash sends only what has not been answered.
"""
import re

from runner.errors import UserError
from runner.files import atomic_write_json, atomic_write_jsonl
from runner.records import read_records
from runner.registry import Job, SubJob
from runner.jobs.finetune import base_model_path
from runner.jobs.frontier_eval.backends import DEFAULT_URLS, HttpBackend, LocalBackend
from runner.jobs.frontier_eval.cache import ResponseCache
from runner.jobs.frontier_eval.evaluate import ask, grade_with_model, summarise
from runner.jobs.frontier_eval.report import write_summary

COMMON = {
    "chains_file": "chains",  # in generate_data_real_facts's data: chains, or chains_hopping_too_late
    "max_chains": 0,  # 0: all
    "nocot_max_tokens": 32,
    "cot_max_tokens": 256,
    "grader": {},  # e.g. {backend: openai, model: gpt-4o-mini}: a model grader on top of alias matching
    "prices": {},  # model -> [USD per 1M input tokens, USD per 1M output tokens], for the cost column
    "http": {"concurrency": 8, "timeout_s": 60.0, "max_retries": 5, "backoff_s": 1.0, "max_backoff_s": 60.0,
             "max_retry_after_s": 120.0},
}
LOCAL_DEFAULTS = {**COMMON, "batch_size": 32}
API_DEFAULTS = {**COMMON, "endpoints": []}


def check_endpoint(spec, where: str) -> None:
    if not isinstance(spec, dict) or spec.get("backend") not in DEFAULT_URLS or not spec.get("model"):
        raise UserError(f"{where}: expected {{backend: openai|anthropic, model: NAME, base_url (optional), "
                        f"api_key_env (optional)}}, got {spec!r}")
    unknown = set(spec) - {"backend", "model", "base_url", "api_key_env"}
    if unknown:
        raise UserError(f"{where}: unknown key(s) {sorted(unknown)}")


def check_config(config: dict) -> None:
    for i, spec in enumerate(config.get("endpoints", [])):
        check_endpoint(spec, f"endpoints[{i}]")
    if config["grader"] and config["grader"].get("backend") != "local":
        check_endpoint(config["grader"], "grader")
    if config["chains_file"] not in ("chains", "chains_hopping_too_late"):
        raise UserError(f"chains_file {config['chains_file']!r}: expected chains or chains_hopping_too_late")


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def load_chains(ctx) -> list:
    path = ctx.input("generate_data_real_facts") / "data" / f"{ctx.config['chains_file']}.jsonl"
    if not path.is_file():
        raise UserError(f"{path} does not exist; for chains_hopping_too_late set generate_data_real_facts's "
                        "hopping_too_late_csv")
    chains = read_records(path, required=("id", "e1", "e2", "e3", "questions"))
    return chains[:ctx.config["max_chains"]] if ctx.config["max_chains"] else chains


def make_grader(ctx):
    spec = ctx.config["grader"]
    if not spec:
        return None
    if spec["backend"] == "local":
        return LocalBackend(base_model_path(ctx), ctx.model.name, ctx.config["batch_size"])
    return HttpBackend(spec, ctx.config["http"], ctx.log)


def evaluate_backends(ctx, backends: list) -> dict:
    chains = load_chains(ctx)
    cache = ResponseCache(ctx.workspace.experiments / "frontier_eval" / "cache" / "responses.jsonl")
    grader = make_grader(ctx)
    summaries = {}
    for backend in backends:
        rows = ask(backend, cache, chains, ctx.config, ctx.log)
        if grader:
            grade_with_model(grader, cache, rows, ctx.log)
        model_name = backend.name.split(":", 1)[1]
        summary = summarise(rows, ctx.config["prices"].get(model_name))
        if summary["failed"] == len(rows):
            raise UserError(f"every request to {backend.name} failed; first reason: {summary['failure_reasons'][0]}")
        if summary["failed"]:
            ctx.log.warning("%s: %d of %d requests failed (reasons in questions.jsonl): %s", backend.name,
                            summary["failed"], len(rows), "; ".join(summary["failure_reasons"][:3]))
        folder = ctx.run_dir / safe_name(backend.name)
        atomic_write_jsonl(folder / "questions.jsonl", rows)
        atomic_write_json(folder / "results.json", {"model": backend.name, **summary})
        summaries[backend.name] = summary
    write_summary(summaries, ctx.run_dir, ctx.run.label)
    return {f"{name}/{task}": s["headline"][task]["accuracy"] for name, s in summaries.items()
            for task in ("two_hop_nocot", "two_hop_cot")}


def run_local(ctx) -> dict:
    return evaluate_backends(ctx, [LocalBackend(base_model_path(ctx), ctx.model.name, ctx.config["batch_size"])])


def run_api(ctx) -> dict:
    if not ctx.config["endpoints"]:
        raise UserError("frontier_eval_api: no endpoints; e.g. --set 'endpoints=[{backend: openai, model: gpt-4o}]'")
    return evaluate_backends(ctx, [HttpBackend(spec, ctx.config["http"], ctx.log) for spec in ctx.config["endpoints"]])


JOB = Job("frontier_eval", "real two-hop facts on local and API models (7 tasks per chain)", (
    SubJob("frontier_eval", "local", "a local model (--model; default the tiny model after finetune_base)", run_local,
           LOCAL_DEFAULTS, requires=("generate_data_real_facts", "finetune_base"), uses_model=True, check=check_config),
    SubJob("frontier_eval", "api", "OpenAI-compatible and Anthropic endpoints (--set endpoints=[...]; keys from env)",
           run_api, API_DEFAULTS, requires=("generate_data_real_facts",), check=check_config),
))
