"""The job registry: jobs are folders under runner/jobs/, sub-jobs are declared as data.

A job package exposes `JOB = Job(...)`. A sub-job's full name is `<job>_<subjob>`; since job names
contain underscores themselves, names are resolved against the registered full names, never by
splitting on "_".
"""
import difflib
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Mapping

from runner import config as typed
from runner.errors import UserError


@dataclass
class NoConfig:
    """A sub-job without settings."""


@dataclass(frozen=True, eq=False)  # sub-jobs are unique objects: compared by identity
class SubJob:
    job: str
    name: str
    help: str
    run: Callable  # run(ctx: RunContext) -> dict of headline metrics, or None
    config: type = NoConfig  # the typed config: a dataclass of runner.config.option fields
    # The recipe: values that replace the config's defaults, a mapping or a function of the resolved
    # model (e.g. tiny vs. 8B recipes); every key must be a field of `config`.
    defaults: Mapping = field(default_factory=dict)
    # Full names of the sub-jobs whose outputs this one reads; or a function of the resolved config
    # returning them, where a (name, seeds) pair reads a seeded sub-job at those seeds (a sub-job that
    # aggregates over seeds, e.g. a report). A plain name maps onto the run's own seed.
    requires: object = ()
    uses_model: bool = False  # one run folder per model; --model is resolved before running
    seeded: bool = False  # one run folder per seed; fans out over --seeds
    # The shipped data it reads: {project path (e.g. "datasets"): check()}. The content under each path is
    # fingerprinted; its check (the library reading all of it) runs before anything is written.
    project_data: Mapping = field(default_factory=dict)
    check: Callable = None  # check(config, model) raises UserError on bad values, before anything runs
    # external_files(config, workspace) -> {path: read(path)}: the files outside the workspace's runs that it
    # reads (experiment YAMLs and the files they name, CSVs, prompt files), each with the library function the
    # run reads it with. Each is read before anything is written (a bad row stops the invocation, naming file,
    # line and field) and fingerprinted by content.
    external_files: Callable = None
    # It trains a model (True, or a function of the run's model saying whether it does): its peak memory is
    # estimated and checked before anything runs; under SLURM with several GPUs it launches one process per GPU.
    trains: object = False
    seeds_from_cli: bool = False  # its config's `seeds` ([] by default) takes the invocation's --seeds
    # Planned only when named itself, not by `--jobs <job>`: it needs input only the user can give (files).
    named_only: bool = False

    @property
    def full_name(self) -> str:
        return f"{self.job}_{self.name}"

    def trains_model(self, model) -> bool:
        return self.trains(model) if callable(self.trains) else self.trains

    def recipe(self, model) -> dict:
        return dict(self.defaults(model) if callable(self.defaults) else self.defaults)

    def default_config(self, model) -> dict:
        """The typed defaults with the recipe for `model` applied."""
        config = typed.defaults(self.config)
        typed.apply_layer(config, self.config, self.recipe(model), f"{self.full_name} recipe")
        return config

    def requirements(self, config=None) -> list:
        """[(full name, seeds or None)] for this config (the model-free defaults if none is given)."""
        names = self.requires(self.default_config(None) if config is None else config) \
            if callable(self.requires) else self.requires
        return [(r, None) if isinstance(r, str) else (r[0], tuple(r[1])) for r in names]


@dataclass(frozen=True)
class Job:
    name: str
    help: str
    subjobs: tuple


class Registry:
    def __init__(self, jobs):
        self.jobs = {}
        self.subjobs = {}
        for job in jobs:
            if job.name in self.jobs:
                raise ValueError(f"job {job.name!r} is registered twice")
            self.jobs[job.name] = job
            for sub in job.subjobs:
                if sub.job != job.name:
                    raise ValueError(f"sub-job {sub.full_name!r} declares job {sub.job!r}, not {job.name!r}")
                if sub.full_name in self.subjobs:
                    raise ValueError(f"sub-job {sub.full_name!r} is registered twice")
                self.subjobs[sub.full_name] = sub
        clashes = set(self.jobs) & set(self.subjobs)
        if clashes:
            raise ValueError(f"names used both as a job and as a sub-job: {sorted(clashes)}")
        for sub in self.subjobs.values():
            for req, _ in sub.requirements():
                if req not in self.subjobs:
                    raise ValueError(f"{sub.full_name} requires unknown sub-job {req!r}")
        self._check_acyclic()

    def _check_acyclic(self):
        visiting, done = set(), set()

        def visit(name, path):
            if name in done:
                return
            if name in visiting:
                raise ValueError(f"dependency cycle: {' -> '.join(path + [name])}")
            visiting.add(name)
            for req, _ in self.subjobs[name].requirements():
                visit(req, path + [name])
            visiting.discard(name)
            done.add(name)

        for name in self.subjobs:
            visit(name, [])

    def resolve(self, names) -> list:
        """Turn `--jobs` names into sub-jobs, in the order given, each once."""
        unknown = [n for n in names if n not in self.jobs and n not in self.subjobs]
        if unknown:
            known = list(self.jobs) + list(self.subjobs)
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                hints.append(f"{name!r}{hint}")
            raise UserError(f"unknown job name {'; '.join(hints)}. See the full list with --list.")
        resolved = []
        for name in names:
            members = [s for s in self.jobs[name].subjobs if not s.named_only] if name in self.jobs \
                else (self.subjobs[name],)
            resolved.extend(s for s in members if s not in resolved)
        return resolved

    def describe(self, verbose: bool = False) -> str:
        """The registry; `verbose` adds every config key with its type, default and help."""
        lines = []
        for job in self.jobs.values():
            lines.append(f"{job.name}: {job.help}")
            for sub in job.subjobs:
                lines.append(f"  {sub.full_name:<40} {sub.help}")
                needs = [name for name, _ in sub.requirements()] + (["a model (--model)"] if sub.uses_model else [])
                if needs:
                    lines.append(f"  {'':<40} requires: {', '.join(needs)}")
                if sub.named_only:
                    lines.append(f"  {'':<40} runs only when named (not part of --jobs {job.name})")
                if verbose:
                    lines.extend(typed.describe(sub.config, sub.default_config(None), indent=" " * 6))
        return "\n".join(lines) if lines else "(no jobs registered)"


def discover(package: str = "runner.jobs") -> Registry:
    """Import every job package under runner/jobs/ and collect its JOB."""
    module = importlib.import_module(package)
    jobs = []
    for info in sorted(pkgutil.iter_modules(module.__path__), key=lambda i: i.name):
        job = importlib.import_module(f"{package}.{info.name}").JOB
        if job.name != info.name:
            raise ValueError(f"runner/jobs/{info.name} declares job {job.name!r}; the folder must match")
        jobs.append(job)
    return Registry(jobs)
