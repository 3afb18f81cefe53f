"""Everything a plan reads from outside its own runs, read before anything is written.

The model folder `--model` names, the shipped data and every external file (an experiment YAML and
the files it names, a CSV, a prompts file) are read with the library functions the runs read them
with, so bad input is one UserError (one line, exit 2, nothing written, `--dry_run` included), not a
failure after the prerequisites have run.
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
