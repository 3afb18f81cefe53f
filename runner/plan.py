"""From requested sub-jobs to an ordered plan of runs, with configs resolved.

A run is one (sub-job, model, seed) instance; model and seed are set only when the sub-job varies
by them. Prerequisites map onto the same model and seed where they vary by them too, so
`--seeds 1 2 3` fans out training and evaluation while shared data is generated once.
"""
import copy
from dataclasses import dataclass, field

import yaml

from runner.errors import UserError


@dataclass(frozen=True)
class Run:
    subjob: object  # runner.registry.SubJob
    model: object = None  # models.ModelRef, for sub-jobs that use a model
    seed: int = None

    @property
    def name(self) -> str:
        return self.subjob.full_name

    @property
    def label(self) -> str:
        parts = [self.model.name] if self.model is not None else []
        if self.seed is not None:
            parts.append(f"seed {self.seed}")
        return f"{self.name} [{', '.join(parts)}]" if parts else self.name

    def run_dir(self, workspace):
        path = workspace.experiments / self.subjob.job / self.subjob.name
        if self.model is not None:
            path = path / self.model.tag
        if self.seed is not None:
            path = path / f"seed_{self.seed}"
        return path


@dataclass
class PlannedRun:
    run: Run
    config: dict
    requested: bool  # named in --jobs (as opposed to added as a prerequisite)
    prerequisites: list = field(default_factory=list)  # Runs this one reads from


# ---- --set key=value -------------------------------------------------------------------------

def parse_overrides(items) -> dict:
    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set lr=1e-4")
        overrides[key.strip()] = value
    return overrides


def _coerce(key: str, raw: str, default):
    """Type a --set value by the type of the default it replaces."""
    try:
        if isinstance(default, bool):
            lowered = raw.strip().lower()
            if lowered in ("true", "yes", "1", "on"):
                return True
            if lowered in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, str):
            return raw
        value = yaml.safe_load(raw)
        if default is not None and not isinstance(value, type(default)):
            raise ValueError
        return value
    except (ValueError, yaml.YAMLError):
        kind = type(default).__name__
        raise UserError(f"--set {key}={raw}: expected a {kind} (the default is {default!r})") from None


def _lookup(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def _assign(config: dict, dotted: str, value):
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value


def config_keys(config: dict, prefix: str = "") -> list:
    """Every settable key: each top-level or nested key, a mapping as a whole and each key inside it."""
    keys = []
    for key, value in config.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, dict):
            keys.extend(config_keys(value, f"{prefix}{key}."))
    return keys


def resolve_config(defaults: dict, overrides: dict) -> dict:
    """The defaults with every override that names one of their keys applied."""
    config = copy.deepcopy(defaults)
    for key, raw in overrides.items():
        try:
            default = _lookup(config, key)
        except KeyError:
            continue
        _assign(config, key, _coerce(key, raw, default))
    return config


def scoped_overrides(overrides: dict, run: Run, scopes) -> dict:
    """The overrides that apply to `run`: plain keys, and `<job or sub-job>.key` naming its job or itself
    (e.g. `--set finetune_spouses.epochs=8` leaves `finetune_base` alone)."""
    applicable = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if rest and head in scopes:
            if head in (run.subjob.job, run.subjob.full_name):
                applicable[rest] = value
        else:
            applicable[key] = value
    return applicable


def check_overrides_apply(overrides: dict, planned, scopes) -> None:
    for key in overrides:
        head, _, rest = key.partition(".")
        scope = head if rest and head in scopes else None
        targets = [p for p in planned if scope in (None, p.run.subjob.job, p.run.subjob.full_name)]
        wanted = rest if scope else key
        valid = sorted({k for p in targets for k in config_keys(p.config)})
        if wanted not in valid:
            names = ", ".join(p.run.label for p in targets) or f"no run of {scope}"
            raise UserError(
                f"--set {key}: no sub-job in this plan ({names}) has a config key {wanted!r}; "
                f"valid keys: {', '.join(valid) or '(none)'}"
            )


# ---- dependency expansion ---------------------------------------------------------------------

def build_plan(registry, requested, model, seeds, overrides, with_prerequisites=True) -> list:
    """Order the requested sub-jobs and (unless disabled) their prerequisites, each run once.

    `model` is the resolved models.ModelRef used by every sub-job that uses a model; `seeds` fan
    out over seeded sub-jobs. Prerequisites come before the runs that need them; otherwise the
    order of `--jobs` is kept.
    """
    def instance(subjob, seed):
        return Run(subjob, model if subjob.uses_model else None, seed if subjob.seeded else None)

    def prerequisites_of(run, config):
        runs = []
        for name, seeds in run.subjob.requirements(config):
            if name not in registry.subjobs:
                raise UserError(f"{run.name}: its config asks for unknown sub-job {name!r}; see --list")
            runs.extend(instance(registry.subjobs[name], seed) for seed in (seeds or [run.seed]))
        return runs

    scopes = {*registry.jobs, *registry.subjobs}
    wanted = [instance(s, seed) for s in requested for seed in (seeds if s.seeded else [None])]
    ordered, seen = [], set()

    def visit(run, is_requested):
        if run in seen:
            return
        seen.add(run)
        config = resolve_config(run.subjob.default_config(run.model), scoped_overrides(overrides, run, scopes))
        if run.subjob.check is not None:  # before its requirements, which may be read from the config
            try:
                run.subjob.check(config)
            except UserError as error:
                raise UserError(f"{run.name}: {error}") from None
        prerequisites = prerequisites_of(run, config)
        if with_prerequisites:
            for req in prerequisites:
                visit(req, req in wanted)
        ordered.append(PlannedRun(run, config, is_requested, prerequisites))

    for run in wanted:
        visit(run, True)
    check_overrides_apply(overrides, ordered, scopes)
    return ordered
