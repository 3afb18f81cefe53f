"""frontier_eval: real two-hop facts asked of local and API models, robust and cheap to rerun.

- `frontier_eval_local`: the `--model` (default: the embedded tiny model after `finetune_base`), so
  the job runs on a fresh machine with no keys.
- `frontier_eval_api`: every entry of `endpoints` (`{backend: openai|anthropic, model, base_url,
  api_key_env}`); keys are read from the named environment variables only.

Per model: `<model>/results.json` and `<model>/questions.jsonl` (every question, its reply or its
failure reason, or why it was not asked: its endpoint down); across the sub-job's models:
summary.md (with the chains set aside per relation pair), summary.csv and cot_vs_nocot.png. The
headline leaves out the chains generate_data_real_facts set aside (shortcut, ambiguous, fragment) and
reports them beside it. A model that answered nothing fails the run, once
every model's files are written.
Replies (and model-grader verdicts) are cached in `W/experiments/frontier_eval/cache/`, so a rerun
or a resumed crash sends only what has not been answered.
"""
import re
from dataclasses import dataclass
from typing import Literal, Optional
from urllib.parse import urlsplit

from runner.config import option
from runner.errors import UserError
from runner.files import atomic_write_json, atomic_write_jsonl
from runner.registry import Job, SubJob
from twohop.data.records import read_records
from twohop.evaluation.frontier.backends import HttpBackend, LocalBackend, api_key
from twohop.evaluation.frontier.cache import ResponseCache
from twohop.evaluation.frontier.evaluate import ask, grade_with_model, summarise
from twohop.reports.frontier import write_summary
from twohop.training.recipes import trained_or_given


@dataclass
class Endpoint:
    backend: Literal["openai", "anthropic"] = option("openai", "wire format: Chat Completions or Messages API")
    model: str = option("", "the model's name at the endpoint")
    base_url: str = option("", "the API's base URL ('': the backend's official one)")
    api_key_env: str = option("", "environment variable holding the key ('': OPENAI_API_KEY / ANTHROPIC_API_KEY)")


@dataclass
class Grader(Endpoint):
    backend: Literal["openai", "anthropic", "local"] = option("openai", "the grader's back end; local: the run's model")


@dataclass
class Http:
    concurrency: int = option(8, "requests in flight at a time", minimum=1)
    timeout_s: float = option(60.0, "seconds before a request times out", minimum=0.1)
    max_retries: int = option(5, "retries of a transient failure (429, 5xx, timeout, dropped connection)", minimum=0)
    backoff_s: float = option(1.0, "first retry's wait; doubles each retry, with jitter", minimum=0.0)
    max_backoff_s: float = option(60.0, "longest wait between retries", minimum=0.0)
    max_retry_after_s: float = option(120.0, "longest Retry-After honoured", minimum=0.0)
    down_after_failures: int = option(3, "refused connections or unresolved host names in a row that mark an "
                                         "endpoint down (its remaining questions are not asked)", minimum=1)


@dataclass
class FrontierConfig:
    chains_file: Literal["chains", "chains_hopping_too_late"] = option(
        "chains", "generate_data_real_facts's chains: the project's, or the Hopping-Too-Late CSV's")
    max_chains: int = option(0, "chains asked (0: all)", minimum=0)
    nocot_max_tokens: int = option(32, "reply length without a chain of thought", minimum=1)
    cot_max_tokens: int = option(256, "reply length with a chain of thought", minimum=1)
    grader: Optional[Grader] = option(None, "a model grader on top of alias matching, e.g. {backend: openai, "
                                            "model: gpt-4o-mini} (null: none)")
    prices: dict[str, list[float]] = option({}, "model -> [USD per 1M input tokens, per 1M output tokens]",
                                            minimum=0.0)
    http: Http = option(Http(), "HTTP client settings")


@dataclass
class LocalConfig(FrontierConfig):
    batch_size: int = option(32, "prompts per forward pass", minimum=1)


@dataclass
class ApiConfig(FrontierConfig):
    endpoints: list[Endpoint] = option([], "the models asked, e.g. [{backend: openai, model: gpt-4o}]")


def check_config(config: dict, model=None) -> None:
    if "endpoints" in config and not config["endpoints"]:
        raise UserError("endpoints: none given; e.g. --set 'endpoints=[{backend: openai, model: gpt-4o}]' "
                        "(or --jobs frontier_eval_local for the local model alone)")
    for where, spec in [(f"endpoints[{i}]", s) for i, s in enumerate(config.get("endpoints", []))] + \
            [("grader", config["grader"] or {})]:
        if spec and not spec["model"] and spec["backend"] != "local":
            raise UserError(f"{where}: needs a model, e.g. {{backend: openai, model: gpt-4o}}")
        if spec.get("base_url"):
            check_url(f"{where}.base_url", spec["base_url"])
    for model, price in config["prices"].items():
        if len(price) != 2:
            raise UserError(f"prices.{model}: {price} must be [USD per 1M input tokens, USD per 1M output tokens]")
    grader = config["grader"] or {}
    if grader.get("backend") == "local" and "batch_size" not in config:
        raise UserError("grader: backend local grades with the run's local model; frontier_eval_api has none")
    if grader.get("backend") == "local" and (grader["model"] or grader["base_url"] or grader["api_key_env"]):
        raise UserError("grader: backend local is the run's own model; drop model, base_url and api_key_env")
    for spec in [*config.get("endpoints", []), grader]:  # last: every other mistake is named first
        if spec and spec["backend"] != "local":
            api_key(spec)  # the key's variable is set, before anything runs


def check_url(where: str, url: str) -> None:
    """Refuse a base URL no request could use (no scheme, another scheme, no host, a bad port) before
    anything runs, rather than retrying it as if the server had answered badly."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (a port that is not a number in 0-65535 raises here)
    except ValueError as error:
        raise UserError(f"{where}: {url!r} is not a valid URL ({error}); e.g. 'https://api.together.xyz/v1'") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        example = f"'http://{url}' or 'https://{url}'" if "://" not in url else "'https://api.together.xyz/v1'"
        raise UserError(f"{where}: {url!r} is not an http(s) URL with a host; write it in full, e.g. {example}")


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def load_chains(ctx) -> list:
    path = ctx.input("generate_data_real_facts") / "data" / f"{ctx.config['chains_file']}.jsonl"
    if not path.is_file():
        raise UserError(f"{path} does not exist; for chains_hopping_too_late set generate_data_real_facts's "
                        "hopping_too_late_csv")
    chains = read_records(path, required=("id", "e1", "e2", "e3", "questions"))
    return chains[:ctx.config["max_chains"]] if ctx.config["max_chains"] else chains


def local_model(ctx) -> LocalBackend:
    """The run's model as a back end: the tiny model after finetune_base, or a real model as it is."""
    return LocalBackend(trained_or_given(ctx.input("finetune_base"), ctx.model.path), ctx.model.name,
                        ctx.config["batch_size"])


def make_grader(ctx):
    spec = ctx.config["grader"]
    if not spec:
        return None
    if spec["backend"] == "local":
        return local_model(ctx)
    return HttpBackend(spec, ctx.config["http"], ctx.log)


def evaluate_backends(ctx, backends: list) -> dict:
    """Every model's questions, results and summary; fails, after writing them, if a model answered nothing."""
    chains = load_chains(ctx)
    cache = ResponseCache(ctx.workspace.experiments / "frontier_eval" / "cache" / "responses.jsonl")
    grader = make_grader(ctx)
    summaries = {backend.name: evaluate_backend(ctx, backend, chains, cache, grader) for backend in backends}
    write_summary(summaries, ctx.run_dir, ctx.run.label)
    silent = [name for name, s in summaries.items() if s["failed"] + s["not_asked"] == s["requests"]]
    if silent:
        reason = summaries[silent[0]]["failure_reasons"][0]
        raise UserError(f"no answer from {', '.join(silent)}; first reason: {reason}; every question is in "
                        "<model>/questions.jsonl with its reason")
    metrics = {}
    for name, s in summaries.items():
        metrics.update({f"{name}/two_hop_nocot": s["headline"]["two_hop_nocot"]["accuracy"],
                        f"{name}/two_hop_cot": s["headline"]["two_hop_cot"]["accuracy"],
                        f"{name}/headline_n": s["headline"]["n"], f"{name}/set_aside": s["set_aside"]["chains"],
                        f"{name}/asked": s["asked"], f"{name}/not_asked": s["not_asked"]})
    return metrics


def evaluate_backend(ctx, backend, chains: list, cache, grader) -> dict:
    """One model: ask (and grade) every question, say what failed or was not asked, write its files."""
    rows = ask(backend, cache, chains, ctx.config, ctx.log)
    if grader:
        grade_with_model(grader, cache, rows, ctx.log)
    summary = summarise(rows, ctx.config["prices"].get(backend.name.split(":", 1)[1]))
    if summary["not_asked"]:
        reason = next(r["error"] for r in rows if not r["asked"])
        ctx.log.warning("%s: %d of %d questions %s", backend.name, summary["not_asked"], len(rows), reason)
    if summary["failed"]:
        ctx.log.warning("%s: %d of %d requests failed (reasons in questions.jsonl): %s", backend.name,
                        summary["failed"], len(rows), "; ".join(summary["failure_reasons"][:3]))
    folder = ctx.run_dir / safe_name(backend.name)
    atomic_write_jsonl(folder / "questions.jsonl", rows)
    atomic_write_json(folder / "results.json", {"model": backend.name, **summary})
    return summary


def run_local(ctx) -> dict:
    return evaluate_backends(ctx, [local_model(ctx)])


def run_api(ctx) -> dict:
    return evaluate_backends(ctx, [HttpBackend(spec, ctx.config["http"], ctx.log) for spec in ctx.config["endpoints"]])


JOB = Job("frontier_eval", "real two-hop facts on local and API models (7 tasks per chain)", (
    SubJob("frontier_eval", "local", "a local model (--model; default the tiny model after finetune_base)", run_local,
           LocalConfig, requires=("generate_data_real_facts", "finetune_base"), uses_model=True, check=check_config),
    SubJob("frontier_eval", "api", "OpenAI-compatible and Anthropic endpoints (--set endpoints=[...]; keys from env)",
           run_api, ApiConfig, requires=("generate_data_real_facts",), check=check_config),
))
