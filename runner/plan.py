"""From requested sub-jobs to an ordered plan of runs, with configs resolved.

A run is one (sub-job, model, seed) instance; model and seed are set only when the sub-job varies
by them. Prerequisites map onto the same model and seed where they vary by them too, so
`--seeds 1 2 3` fans out training and evaluation while shared data is generated once.
"""
from dataclasses import dataclass, field

from runner import config as typed
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


# ---- config: typed layers and --set key=value ------------------------------------------------

def parse_overrides(items) -> dict:
    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set lr=1e-4")
        overrides[key.strip()] = value
    return overrides


def resolve_config(subjob, model, overrides: dict) -> dict:
    """The sub-job's config in layers: typed defaults, the recipe for `model`, the file a config-file
    field names (e.g. an experiment YAML), then `--set` (already scoped to this run). The file's loader
    sees the config with `--set` applied (e.g. the root its file names start from); `--set` still wins
    over the file. Every value is checked against its field's type; an override naming no field of this
    sub-job is left to `check_overrides_apply`, which refuses it if no planned sub-job has it."""
    schema = subjob.config
    config = subjob.default_config(model)
    apply_overrides(config, schema, overrides)
    file_field = typed.config_file_field(schema)
    if file_field and config[file_field[0]]:
        name, loader = file_field
        typed.apply_layer(config, schema, loader(config[name], config), config[name])
        apply_overrides(config, schema, overrides)
    return config


def apply_overrides(config: dict, schema, overrides: dict) -> None:
    """The `--set` values naming a field of `schema`, each read as its type says."""
    for key, raw in overrides.items():
        found = typed.field_at(schema, key)
        if found is not None:
            typed.assign(config, schema, key, typed.parse_text(raw, found[1]), "--set")


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
        valid = sorted({k for p in targets for k in typed.keys(p.run.subjob.config)})
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
        try:
            config = resolve_config(run.subjob, run.model, scoped_overrides(overrides, run, scopes))
            if run.subjob.seeds_from_cli and not config["seeds"]:
                config["seeds"] = list(seeds)
            if run.subjob.check is not None:  # before its requirements, which may be read from the config
                run.subjob.check(config, run.model)
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
