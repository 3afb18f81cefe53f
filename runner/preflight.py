"""Everything a plan reads from outside its own runs, read before anything is written, and whether its
training runs fit in memory.

The model folder `--model` names, the shipped data and every external file (an experiment YAML and
the files it names, a CSV, a prompts file) are read with the library functions the runs read them
with, so bad input is one UserError (one line, exit 2, nothing written, `--dry_run` included), not a
failure after the prerequisites have run. A training run whose estimated peak memory exceeds what the
device has free is refused the same way, naming settings that would fit, and so is a run that needs a
CUDA device where none is visible.
"""
from runner.errors import UserError


def check_inputs(plan, workspace) -> None:
    """Raise a UserError naming the first bad input of `plan` (a list of plan.PlannedRun)."""
    models = {p.run.model for p in plan if p.run.model is not None}
    if models:
        from models import check_model
        for model in models:
            check_model(model)
    for check in dict.fromkeys(check for p in plan for check in p.run.subjob.project_data.values()):
        check()
    read_already = set()
    for planned in plan:
        external_files = planned.run.subjob.external_files
        for path, read in (external_files(planned.config, workspace) if external_files else {}).items():
            if (path, read) in read_already:
                continue
            read_already.add((path, read))
            try:
                read(path)
            except UserError as error:
                raise UserError(f"{planned.run.name}: {error}") from None


def memory_checks(plan, executor, launcher: str) -> dict:
    """{Run: twohop.training.memory.MemoryCheck} for each run of `plan` that will train here: its peak memory
    estimated from its config and model config, against the memory free on this machine's device. Runs done
    already (and not forced) are left out; under SLURM each job checks on its own node when it starts. A
    run with 4-bit base weights (peft=qlora) that would train here without a CUDA device is refused."""
    will_run = executor.runs_to_execute(plan)
    training = [p for p in plan if p.run.subjob.trains_model(p.run.model) and p.run in will_run]
    if not training or launcher != "local":
        return {}
    from twohop.training.lora import require_cuda
    for planned in training:
        if planned.config.get("peft") == "qlora":
            try:
                require_cuda()
            except UserError as error:
                raise UserError(f"{planned.run.name}: {error}") from None
    from twohop.training.memory import check_training_memory, this_device
    device = this_device()
    return {p.run: check_training_memory(p.config, p.run.model, device) for p in training}


def refuse_unfit(checks: dict) -> None:
    """A UserError naming the first run that cannot fit and the settings that would."""
    for run, check in checks.items():
        if not check.fits:
            raise UserError(f"{run.label}: {check.refusal()}")

