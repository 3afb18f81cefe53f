"""`--launcher slurm`: each run of the plan becomes its own sbatch job, prerequisites as afterok.

Every job runs `runner/main.py --jobs <its sub-job> --no_deps` with the run's model, seed and the
`--set` overrides that apply to it, so the cluster runs the graph in order and in parallel where it
can; `--kill-on-invalid-dep=yes` makes SLURM cancel the dependents of a job that fails. Runs that
are done with the same inputs are skipped, and so are runs an earlier invocation submitted that are
still queued or running (their job ids are reused as dependencies). Scripts and `submitted.json`
go to `W/experiments/runner/slurm-<stamp>/`.

Resources: `--set slurm.KEY=V` (or `<job>.slurm.KEY=V`, `<sub-job>.slurm.KEY=V`) with KEY one of
RESOURCES; they are not part of a run's config, so changing them never invalidates finished work.
"""
import datetime as dt
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from runner.errors import UserError
from runner.files import atomic_write_json, atomic_write_text, read_json
from runner import config as typed
from runner.plan import scoped_overrides

RESOURCES = {"partition": "", "time": "", "mem": "", "account": "", "gpus": 0, "cpus_per_task": 0,
             "extra": [], "setup": ""}  # extra: further "#SBATCH ..." lines; setup: a shell line run first
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def split_slurm_overrides(overrides: dict) -> tuple:
    """(the plan's overrides, {scope or None: {resource: raw value}}) from the --set items."""
    plan, slurm = {}, {}
    for key, value in overrides.items():
        parts = key.split(".")
        if "slurm" in parts[:2] and len(parts) == parts.index("slurm") + 2:
            scope = parts[0] if parts.index("slurm") == 1 else None
            resource = parts[-1]
            if resource not in RESOURCES:
                raise UserError(f"--set {key}: unknown SLURM resource {resource!r}; valid: {', '.join(RESOURCES)}")
            slurm.setdefault(scope, {})[resource] = value
        else:
            plan[key] = value
    return plan, slurm


def resources_for(run, slurm_overrides: dict) -> dict:
    import yaml
    resources = dict(RESOURCES)
    for scope in (None, run.subjob.job, run.subjob.full_name):  # the narrower scope wins
        for key, raw in slurm_overrides.get(scope, {}).items():
            value = yaml.safe_load(raw) if key in ("gpus", "cpus_per_task", "extra") else raw
            resources[key] = value if key != "extra" or isinstance(value, list) else [value]
    return resources


def child_command(planned, overrides: dict, scopes, workspace, force: bool) -> list:
    """The runner command line that runs exactly this planned run, with the overrides it uses."""
    run = planned.run
    schema = run.subjob.config
    applicable = {k: v for k, v in scoped_overrides(overrides, run, scopes).items() if typed.field_at(schema, k)}
    command = ["runner/main.py", "--workspace_path", str(workspace.root), "--jobs", run.name, "--no_deps"]
    if run.model is not None:  # a preset, a name under W/transformers or a hub name as written; a path in full
        command += ["--model", str(run.model.path) if run.model.source == "path" else run.model.name]
    if run.seed is not None:
        command += ["--seeds", str(run.seed)]
    elif run.subjob.seeds_from_cli:  # it reads the seeds of its config, which defaulted to this invocation's --seeds
        command += ["--seeds", *map(str, planned.config["seeds"])]
    for key, value in applicable.items():
        if typed.field_at(schema, key)[0].metadata.get("path"):  # the job runs elsewhere: pass the absolute path
            value = planned.config[key]
        command += ["--set", f"{key}={value}"]
    return command + (["--force"] if force and planned.requested else [])


def render_script(planned, command: list, resources: dict, dependencies: list, log_dir: Path) -> str:
    run = planned.run
    lines = ["#!/bin/bash", f"#SBATCH --job-name=twohop-{run.name}" + (f"-seed{run.seed}" if run.seed is not None else ""),
             f"#SBATCH --output={log_dir}/{run_slug(run)}-%j.out"]
    for flag, key in (("partition", "partition"), ("time", "time"), ("mem", "mem"), ("account", "account"),
                      ("gpus", "gpus"), ("cpus-per-task", "cpus_per_task")):
        if resources[key]:
            lines.append(f"#SBATCH --{flag}={resources[key]}")
    if dependencies:
        lines += [f"#SBATCH --dependency=afterok:{':'.join(dependencies)}", "#SBATCH --kill-on-invalid-dep=yes"]
    lines += [line if line.startswith("#SBATCH") else f"#SBATCH {line}" for line in resources["extra"]]
    lines += ["set -euo pipefail"] + ([resources["setup"]] if resources["setup"] else [])
    lines.append(f"cd {shlex.quote(str(PROJECT_ROOT))}")
    gpus = int(resources["gpus"] or 0)
    if gpus > 1 and run.subjob.trains_model(run.model):  # multi-GPU training: one process per GPU, FSDP
        launcher = ["accelerate", "launch", "--config_file", "configs/accelerate_fsdp.yaml", "--num_processes", str(gpus)]
    else:
        launcher = [shlex.quote(sys.executable)]
    lines.append(" ".join(launcher + [shlex.quote(part) for part in command]))
    return "\n".join(lines) + "\n"


def run_slug(run) -> str:
    return run.name + (f"-{run.model.tag}" if run.model is not None else "") + (f"-seed{run.seed}" if run.seed is not None else "")


def sbatch(script: Path) -> str:
    if shutil.which("sbatch") is None:
        raise UserError("sbatch is not on PATH: --launcher slurm needs the SLURM client tools "
                        "(on a cluster login node, e.g. `module load slurm`)")
    result = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise UserError(f"sbatch refused {script.name}: {message[-1] if message else 'exit ' + str(result.returncode)}")
    return result.stdout.strip().split(";")[0]


def job_state(job_id: str) -> str:
    """SLURM's state of a job (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ...), or "" if unknown."""
    result = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    for field in result.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return ""


def submit(plan, executor, overrides: dict, slurm_overrides: dict, scopes, dry_run: bool, log) -> dict:
    """Submit the plan's runs that need running; returns {run label: job id}."""
    workspace = executor.workspace
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = workspace.runner_logs / f"slurm-{stamp}"
    known_path = workspace.runner_logs / "slurm_jobs.json"  # run folder -> last job id, across invocations
    known = read_json(known_path) if known_path.is_file() else {}
    submitted, skipped = {}, []
    for planned in plan:
        run = planned.run
        run_dir = str(run.run_dir(workspace))
        dependencies = [submitted[req.label] for req in planned.prerequisites if req.label in submitted]
        status = executor.read_status(run.run_dir(workspace))
        if (not dependencies and status.get("state") == "done" and not (executor.force and planned.requested)
                and status.get("fingerprint") == executor.input_fingerprint(planned)):
            skipped.append(f"{run.label}: done")
            continue
        if run_dir in known and not dry_run and job_state(known[run_dir]) in ACTIVE:
            submitted[run.label] = known[run_dir]
            skipped.append(f"{run.label}: already queued or running as job {known[run_dir]}")
            continue
        command = child_command(planned, overrides, scopes, workspace, executor.force)
        script_text = render_script(planned, command, resources_for(run, slurm_overrides),
                                    dependencies if not dry_run else [f"<{d}>" for d in dependencies], out_dir)
        if dry_run:
            print(f"# ---- {run.label}\n{script_text}")
            submitted[run.label] = run.label
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        script = out_dir / f"{run_slug(run)}.sbatch"
        atomic_write_text(script, script_text)
        submitted[run.label] = known[run_dir] = sbatch(script)
        log.info("submitted %s as job %s%s", run.label, submitted[run.label],
                 f" (after {', '.join(dependencies)})" if dependencies else "")
    for line in skipped:
        log.info("not submitted: %s", line)
    if not dry_run and submitted:
        atomic_write_json(out_dir / "submitted.json", submitted)
        atomic_write_json(known_path, known)
        log.info("scripts and submitted.json: %s", out_dir)
    return submitted


def wait_for(submitted: dict, poll_s: float, log) -> dict:
    """Poll until every submitted job has left the queue; returns {run label: final SLURM state}."""
    states = {}
    while True:
        states = {label: job_state(job_id) for label, job_id in submitted.items()}
        if not any(state in ACTIVE for state in states.values()):
            break
        time.sleep(poll_s)
    for label, state in states.items():
        log.info("%-50s job %-8s %s", label, submitted[label], state or "UNKNOWN (gone from scontrol)")
    return states
