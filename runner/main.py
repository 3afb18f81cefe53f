"""Run the two-hop study's jobs: `python runner/main.py --workspace_path W --jobs NAME [NAME ...]`.

NAME is a job (all its sub-jobs) or `<job>_<subjob>` (one). Prerequisites are added and run
first; finished runs with the same inputs are skipped. See --list for the registry.

Invocations may share a workspace: one run folder has one writer at a time (its lock.json names
the holder). A run another invocation is executing is waited for, then skipped if that one
finished it; a lock whose process died, or whose heartbeat stopped, is taken over.
"""
import argparse
import datetime as dt
import logging
import os
import signal
import sys
from pathlib import Path

from runner import config as typed
from runner import locks, slurm
from runner.errors import UserError
from runner.execute import Executor, Workspace, summary_table
from runner.plan import build_plan, parse_overrides
from runner.preflight import check_inputs, memory_checks, refuse_unfit
from runner.progress import Progress
from runner.slurm import split_slurm_overrides

log = logging.getLogger("twohop")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="runner/main.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Outputs go to W/experiments/<job>/<subjob>/[<model>/][seed_<n>/]; one log per "
               "invocation in W/experiments/runner/.",
    )
    parser.add_argument("--workspace_path",
                        help="workspace root W, outside the project checkout (created if missing): W/transformers, "
                             "W/datasets, W/experiments")
    parser.add_argument("--jobs", nargs="+", metavar="NAME", default=[],
                        help="jobs or sub-jobs to run, in this order (see --list)")
    parser.add_argument("--list", action="store_true", help="list every job and sub-job, then exit")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="with --list: every config key of every sub-job, with its type, default and help")
    parser.add_argument("--help_config", metavar="SUBJOB",
                        help="print every config key of one sub-job (type, default for --model, help), then exit")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the resolved plan (prerequisites included) and run nothing")
    parser.add_argument("--force", action="store_true",
                        help="rerun the named sub-jobs even if they finished with the same inputs")
    parser.add_argument("--no_deps", action="store_true",
                        help="do not add prerequisites; their outputs must already exist")
    parser.add_argument("--no_wait", action="store_true",
                        help="if another live invocation is running a run of the plan, exit 2 naming it "
                             "instead of waiting for it (not the opposite of --wait, which is for SLURM)")
    parser.add_argument("--model", default=None,
                        help="model for sub-jobs that use one: an embedded preset (tiny, tiny-h128-l2, "
                             "tiny-h128-l4, tiny-h256-l4, tiny-organism), a folder name under W/transformers/, a path, or a Hugging Face name "
                             "org/name[@revision] from the local cache, downloaded there if the hub is reachable "
                             "(default: tiny)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1], metavar="N",
                        help="seeds for seeded sub-jobs; each seed is its own run (default: 1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config key of the planned sub-jobs (typed like its default; "
                             "nested keys with dots); KEY applies to every planned sub-job that has it, "
                             "<job>.KEY or <sub-job>.KEY (e.g. finetune_spouses.epochs=8) to that one only; "
                             "repeatable")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local",
                        help="local: run the plan in this process; slurm: submit each run as an sbatch job "
                             "with afterok dependencies (resources: --set [<job>.]slurm.KEY=V, KEY one of "
                             "partition, time, mem, account, gpus, cpus_per_task, extra, setup)")
    parser.add_argument("--wait", action="store_true",
                        help="with --launcher slurm: wait until the submitted jobs leave the queue, report each "
                             "job's final state and exit non-zero unless all completed")
    args = parser.parse_args(argv)
    if not (args.list or args.help_config) and (args.workspace_path is None or not args.jobs):
        parser.error("--workspace_path and --jobs are required (or use --list / --help_config)")
    return args


def setup_logging(workspace: Workspace) -> Path:
    workspace.runner_logs.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = workspace.runner_logs / f"{stamp}-{os.getpid()}.log"
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
    invocation = logging.FileHandler(path, encoding="utf-8")
    invocation.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(console)
    log.addHandler(invocation)
    return path


def describe_plan(plan, executor, memory: dict = None) -> str:
    """Each run of the plan: why it is there, its state now, whether it will run or be skipped as done (the
    executor's own test: same inputs, no prerequisite running again), and what it needs; `memory` ({Run:
    MemoryCheck}) adds each training run's peak memory estimate."""
    lines, will_run = ["plan:"], executor.runs_to_execute(plan)
    for i, planned in enumerate(plan, 1):
        run = planned.run
        run_dir = run.run_dir(executor.workspace)
        status = executor.read_status(run_dir).get("state", "not run")
        if run not in will_run:
            action = "will be skipped"
        elif status == "done":
            action = "forced: will run again" if executor.force and planned.requested else \
                "will run again: its inputs changed"
        else:
            action = "will run"
        why = "requested" if planned.requested else "prerequisite"
        needs = f"; needs {', '.join(r.label for r in planned.prerequisites)}" if planned.prerequisites else ""
        lines.append(f"  {i}. {run.label}  ({why}; now: {status}, {action}{needs})")
        lines.append(f"     -> {run_dir}")
        if memory and run in memory:
            lines.append(f"     memory: {memory[run].summary()}{'' if memory[run].fits else '  DOES NOT FIT'}")
    return "\n".join(lines)


def help_config(registry, args) -> str:
    """Every config key of one sub-job, with the defaults it takes for --model (the tiny model if none)."""
    if args.help_config not in registry.subjobs:
        raise UserError(f"--help_config {args.help_config!r}: name one sub-job (see --list)")
    subjob = registry.subjobs[args.help_config]
    from models import DEFAULT_MODEL, resolve_model
    transformers = Workspace(args.workspace_path).transformers if args.workspace_path else Path("transformers")
    name = DEFAULT_MODEL if args.model is None else args.model
    model = resolve_model(name, transformers, download=False) if subjob.uses_model else None
    header = (f"{subjob.full_name}: {subjob.help}\nconfig keys (--set KEY=VALUE)"
              + (f", with the defaults for model {model.name}:" if model else ":"))
    return "\n".join([header, *typed.describe(subjob.config, subjob.default_config(model))])


def wait_for_slurm(submitted, workspace: Workspace) -> int:
    """Wait for the submitted SLURM jobs; 1 if any did not complete."""
    states = slurm.wait_for(submitted, poll_s=2.0, log=log)
    unfinished = [label for label, state in states.items() if state != "COMPLETED"]
    if unfinished:
        log.error("%d of %d SLURM jobs did not complete: %s (logs in %s)", len(unfinished), len(states),
                  ", ".join(unfinished), workspace.runner_logs)
    return 1 if unfinished else 0


def main(argv=None, registry=None) -> int:
    args = parse_args(argv)
    try:
        if not (args.list or args.help_config):  # checked first: a bad workspace costs no imports
            workspace = Workspace(args.workspace_path)
        if registry is None:
            from runner.registry import discover
            registry = discover()
        if args.list:
            print(registry.describe(verbose=args.verbose))
            return 0
        if args.help_config:
            print(help_config(registry, args))
            return 0
        requested = registry.resolve(args.jobs)
        overrides, slurm_overrides = split_slurm_overrides(parse_overrides(args.overrides))
        if slurm_overrides and args.launcher != "slurm":
            raise UserError("--set slurm.*: SLURM resources apply only with --launcher slurm")
        from models import DEFAULT_MODEL, resolve_model
        model = resolve_model(DEFAULT_MODEL if args.model is None else args.model, workspace.transformers,
                              download=not args.dry_run)
        plan = build_plan(registry, requested, model, args.seeds, overrides,
                          with_prerequisites=not args.no_deps)
        command = ["runner/main.py", *(argv if argv is not None else sys.argv[1:])]
        executor = Executor(workspace, force=args.force, wait=not args.no_wait, command=command)
        if args.no_deps:
            executor.check_prerequisites_done(plan)
        check_inputs(plan, workspace)
        memory = memory_checks(plan, executor, args.launcher)
        scopes = {*registry.jobs, *registry.subjobs}
        if args.dry_run:
            print(describe_plan(plan, executor, memory))
            if args.launcher == "slurm":
                slurm.submit(plan, executor, overrides, slurm_overrides, scopes, True, log)
            refuse_unfit(memory)
            return 0
        refuse_unfit(memory)
        if args.no_wait:  # refuse before writing anything; a lock taken later is refused when met
            for planned in plan:
                locks.refuse_if_held(planned.run.run_dir(workspace))
        workspace.create()
        log_path = setup_logging(workspace)
        log.info("invocation log: %s", log_path)
        log.info("%s", describe_plan(plan, executor, memory))
        if args.launcher == "slurm":
            submitted = slurm.submit(plan, executor, overrides, slurm_overrides, scopes, False, log)
            return wait_for_slurm(submitted, workspace) if args.wait else 0
        progress = Progress(plan, executor, log)
        for index, planned in enumerate(plan):
            progress.start(index)
            progress.finish(index, executor.execute(planned))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    outcomes = list(executor.outcomes.values())
    log.info("summary:\n%s", summary_table(outcomes))
    failed = [o for o in outcomes if o.state in ("failed", "blocked")]
    if failed:
        log.error("%d of %d runs did not finish; see their log.txt", len(failed), len(outcomes))
    return 1 if failed else 0


def interrupt(signum, frame):
    """SIGTERM (SLURM's scancel and time limit, `kill`) as a Ctrl-C: the run is marked failed
    ("interrupted", resumable) and its lock is released, instead of both left as if it were alive."""
    raise KeyboardInterrupt(f"signal {signum}")


def cli() -> None:
    """The `twohop` console command."""
    signal.signal(signal.SIGTERM, interrupt)
    sys.exit(main())


if __name__ == "__main__":
    cli()
