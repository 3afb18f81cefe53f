"""Executing a plan: one run folder per run, with config, status, log, outputs and metrics.

Status protocol (status.json, always written atomically):
  running -> done | failed. `done` is written only after every output is in place, so a run
  killed at any point is never mistaken for finished work. A rerun with the same input
  fingerprint resumes in the same folder (sub-jobs see `ctx.resuming`); a different fingerprint
  starts from an empty folder. A done run with the same fingerprint is skipped unless forced.
Only the holder of a run folder's lock (runner.locks) writes in it: a second invocation that needs
the run waits for the holder and then skips, resumes or restarts it as above.
The input fingerprint covers the resolved config, the model's contents, the content of every
external file the run reads (experiment YAMLs and the files they name, CSVs, prompt files) and the
`run_id` of every prerequisite's finished run, so remaking or editing an input invalidates what was
built from it.
"""
import datetime as dt
import functools
import logging
import os
import platform
import subprocess
import time
import traceback
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from runner.errors import UserError
from runner.files import (atomic_write_json, clear_directory, fingerprint, read_json, remove_stale_temporaries,
                          sha256_file)
from runner.locks import LOCK_NAME, RunLock

log = logging.getLogger("twohop")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
TRACKED_PACKAGES = ("torch", "transformers", "accelerate", "safetensors", "tokenizers", "datasets",
                    "lm_eval", "numpy")


class Workspace:
    """The `--workspace_path` tree: transformers/, datasets/, experiments/."""

    def __init__(self, root):
        if not str(root).strip():
            raise UserError("--workspace_path is empty; give a folder, e.g. --workspace_path ~/twohop-w")
        self.root = Path(root).expanduser().resolve()
        check_workspace_root(self.root)

    def create(self) -> None:
        """Make the tree; called once the plan is valid, so bad input leaves nothing behind."""
        for sub in (self.transformers, self.datasets, self.experiments):
            sub.mkdir(parents=True, exist_ok=True)

    transformers = property(lambda self: self.root / "transformers")
    datasets = property(lambda self: self.root / "datasets")
    experiments = property(lambda self: self.root / "experiments")
    runner_logs = property(lambda self: self.root / "experiments" / "runner")


def check_workspace_root(root: Path) -> None:
    """Refuse a workspace the runner cannot or should not write into, before it writes anything."""
    if root == PROJECT_ROOT or PROJECT_ROOT in root.parents:
        raise UserError(f"--workspace_path {root} is inside the project checkout {PROJECT_ROOT}, where runs would "
                        f"mix with its code and shipped data; choose a folder outside it, "
                        f"e.g. {PROJECT_ROOT.parent / 'W'}")
    existing = next(p for p in (root, *root.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"--workspace_path {root}: {existing} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--workspace_path {root}: {existing} is not writable; choose a folder you can write to")


@dataclass
class RunContext:
    """What a sub-job's `run(ctx)` gets."""
    run: object  # runner.plan.Run
    config: dict
    run_dir: Path
    workspace: Workspace
    inputs: dict  # (prerequisite full name, seed) -> its run folder
    resuming: bool
    log: logging.Logger

    @property
    def seed(self):
        return self.run.seed

    @property
    def model(self):
        return self.run.model

    def input(self, name: str, seed: int = None) -> Path:
        """The run folder of prerequisite `name`; `seed` picks one of several (a sub-job reading many seeds)."""
        found = [path for (n, s), path in self.inputs.items() if n == name and seed in (None, s)]
        if len(found) != 1:
            raise KeyError(f"{self.run.name} has {len(found)} inputs named {name} (seed {seed})")
        return found[0]


@dataclass
class Outcome:
    run: object
    state: str  # done | cached | failed | blocked
    run_dir: Path
    duration_s: float = 0.0
    message: str = ""


@dataclass
class Executor:
    workspace: Workspace
    force: bool = False
    wait: bool = True  # for a run folder another invocation holds; False: refuse (runner.locks.LockBusy)
    command: list = field(default_factory=list)
    outcomes: dict = field(default_factory=dict)  # Run -> Outcome

    # ---- status files ---------------------------------------------------------------------
    @staticmethod
    def read_status(run_dir: Path) -> dict:
        try:
            return read_json(run_dir / "status.json")
        except (FileNotFoundError, ValueError):
            return {}

    def prerequisite_status(self, run) -> dict:
        return self.read_status(run.run_dir(self.workspace))

    def check_prerequisites_done(self, planned_runs) -> None:
        """With --no_deps: every prerequisite outside the plan must already be done."""
        in_plan = {p.run for p in planned_runs}
        for planned in planned_runs:
            for req in planned.prerequisites:
                if req not in in_plan and self.prerequisite_status(req).get("state") != "done":
                    raise UserError(
                        f"{planned.run.label} needs the outputs of {req.label} in {req.run_dir(self.workspace)}, "
                        f"which is not done; run `--jobs {req.name}` first or drop --no_deps")

    def input_fingerprint(self, planned) -> str:
        from models import model_fingerprint

        run = planned.run
        return fingerprint({
            "subjob": run.name,
            "config": planned.config,
            "seed": run.seed,
            "model": model_fingerprint(run.model.path) if run.model is not None else None,
            "project_data": project_data_fingerprint(tuple(run.subjob.project_data)),
            "external_files": self.external_files(planned),
            "inputs": {req.label: self.prerequisite_status(req).get("run_id") for req in planned.prerequisites},
        })

    def external_files(self, planned) -> dict:
        """path -> content hash of every file outside the workspace's runs that the run reads."""
        subjob = planned.run.subjob
        if subjob.external_files is None:
            return {}
        files = subjob.external_files(planned.config, self.workspace)  # {path: its reader}
        return {str(p): sha256_file(p) if Path(p).is_file() else "missing" for p in files}

    def runs_to_execute(self, plan) -> set:
        """The runs of `plan` (in dependency order) that `execute` will not skip: not done with the same
        inputs, forced, or after a prerequisite that runs again (which gives it a new input)."""
        will_run = set()
        for planned in plan:
            model = planned.run.model
            unchanged = (model is None or model.path.is_dir()) and self.done_with_same_inputs(planned)
            if not unchanged or set(planned.prerequisites) & will_run:
                will_run.add(planned.run)
        return will_run

    def done_with_same_inputs(self, planned) -> bool:
        previous = self.read_status(planned.run.run_dir(self.workspace))
        return (previous.get("state") == "done" and not (self.force and planned.requested)
                and previous.get("fingerprint") == self.input_fingerprint(planned))

    # ---- one run ---------------------------------------------------------------------------
    def execute(self, planned) -> Outcome:
        run = planned.run
        run_dir = run.run_dir(self.workspace)
        blocked = [req for req in planned.prerequisites
                   if self.outcomes.get(req) is not None and self.outcomes[req].state in ("failed", "blocked")]
        if blocked:
            return self._record(Outcome(run, "blocked", run_dir,
                                        message=f"prerequisite {blocked[0].label} did not finish"))
        if run.model is not None:
            self.ensure_model(run.model)
        cached = self._cached(planned, run_dir)  # done work is skipped without writing anything
        if cached:
            return cached
        run_dir.mkdir(parents=True, exist_ok=True)
        with RunLock(run_dir).acquire(wait=self.wait):
            return self._cached(planned, run_dir) or self._start(planned, run_dir)

    def ensure_model(self, model) -> None:
        """Build an embedded model once, even when several invocations share the workspace: the builder
        holds a lock beside the model's folder, and whoever waited for it finds the folder built."""
        from models import ensure_model
        if model.embedded_preset and not model.path.exists():
            build_lock = model.path.parent / f".{model.path.name}.build"
            build_lock.mkdir(parents=True, exist_ok=True)
            with RunLock(build_lock).acquire(wait=self.wait):
                ensure_model(model)
        ensure_model(model)

    def _cached(self, planned, run_dir: Path):
        """The outcome of skipping a run done with the same inputs (perhaps by the lock's last holder)."""
        if self.done_with_same_inputs(planned):
            previous = self.read_status(run_dir)
            log.info("skip %s: done with the same inputs (%s); --force reruns it", planned.run.label, run_dir)
            return self._record(Outcome(planned.run, "cached", run_dir, previous.get("duration_s", 0.0)))
        return None

    def _start(self, planned, run_dir: Path) -> Outcome:
        """Resume a killed or failed run with the same inputs in place; otherwise start from an empty folder."""
        run = planned.run
        fp = self.input_fingerprint(planned)
        previous = self.read_status(run_dir)
        resuming = previous.get("fingerprint") == fp and previous.get("state") in ("running", "failed")
        if not resuming:
            clear_directory(run_dir, keep=(LOCK_NAME,))
        remove_stale_temporaries(run_dir)  # ours to remove: we hold the lock
        started = time.time()
        status = {"state": "running", "fingerprint": fp, "started": _iso(started), "host": platform.node(),
                  "subjob": run.name, "model": run.model.name if run.model else None, "seed": run.seed}
        atomic_write_json(run_dir / "status.json", status)
        atomic_write_json(run_dir / "config.json", self._config_record(planned, run_dir))

        handler = logging.FileHandler(run_dir / "log.txt", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.info("run %s -> %s%s", run.label, run_dir, " (resuming)" if resuming else "")
        ctx = RunContext(run, planned.config, run_dir, self.workspace,
                         {(req.name, req.seed): req.run_dir(self.workspace) for req in planned.prerequisites},
                         resuming, logging.getLogger(f"twohop.{run.name}"))
        state, message = "failed", "interrupted"  # what a KeyboardInterrupt leaves behind
        try:
            metrics = run.subjob.run(ctx)
            if metrics is not None:
                atomic_write_json(run_dir / "metrics.json", metrics)
            state, message = "done", ""
        except UserError as error:
            log.error("%s failed: %s", run.label, error)
            state, message = "failed", str(error)
        except Exception as error:  # one failing sub-job must not hide the others' results
            log.error("%s failed:\n%s", run.label, traceback.format_exc())
            state, message = "failed", f"{type(error).__name__}: {error}"
        finally:
            ended = time.time()
            status.update(state=state, ended=_iso(ended), duration_s=round(ended - started, 3))
            if state == "done":
                status["run_id"] = uuid.uuid4().hex
            else:
                status["error"] = message
            atomic_write_json(run_dir / "status.json", status)
            log.info("%s %s in %.1fs", run.label, status["state"], ended - started)
            log.removeHandler(handler)
            handler.close()
        return self._record(Outcome(run, state, run_dir, status["duration_s"], message))

    def _record(self, outcome: Outcome) -> Outcome:
        self.outcomes[outcome.run] = outcome
        if outcome.state == "blocked":
            log.warning("skip %s: %s", outcome.run.label, outcome.message)
        return outcome

    def _config_record(self, planned, run_dir: Path) -> dict:
        run = planned.run
        return {
            "subjob": run.name,
            "model": {"name": run.model.name, "path": str(run.model.path)} if run.model else None,
            "seed": run.seed,
            "config": planned.config,
            "inputs": {req.label: str(req.run_dir(self.workspace)) for req in planned.prerequisites},
            "external_files": self.external_files(planned),
            "project_revision": project_revision(),
            "packages": package_versions(),
            "python": platform.python_version(),
            "machine": machine_facts(),
            "command": self.command,
            "run_dir": str(run_dir),
        }


@functools.lru_cache(maxsize=None)
def project_data_fingerprint(paths: tuple) -> str:
    """Hash of the files under the given project paths, so edited tables invalidate old runs."""
    files = sorted(f for p in paths for f in (PROJECT_ROOT / p).rglob("*") if f.is_file())
    return fingerprint([(str(f.relative_to(PROJECT_ROOT)), sha256_file(f)) for f in files]) if files else None


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat(timespec="seconds")


def project_revision() -> str:
    """The git commit of the project, with '+dirty' for uncommitted changes; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@functools.lru_cache(maxsize=None)
def machine_facts() -> dict:
    """What a run's floating-point results depend on besides the code and the packages: torch picks
    its CPU kernels by instruction set and splits sums over threads, so the same run on another CPU
    type or thread count trains a different model."""
    cpu = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor describes them all
            key, _, value = line.partition(":")
            cpu[key.strip()] = value.strip()
    except OSError:
        pass
    flags = set(cpu.get("flags", "").split())
    return {"cpu": cpu.get("model name", platform.processor()) or None,
            "cpu_family_model": f"{cpu['cpu family']}/{cpu['model']}" if "model" in cpu else None,
            "cpu_features": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def summary_table(outcomes) -> str:
    """One row per run (sub-job, state, duration, output folder); reasons for failures below it."""
    rows = [("sub-job", "state", "duration", "output folder")]
    rows += [(o.run.label, o.state, f"{o.duration_s:.1f}s", str(o.run_dir)) for o in outcomes]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
        if i and outcomes[i - 1].message:
            lines.append(f"    reason: {outcomes[i - 1].message}")
    return "\n".join(lines)
