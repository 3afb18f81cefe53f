"""One progress line per run of the plan: where we are, time elapsed, and an estimate of what remains.

A run's expected duration is the last one measured for the same sub-job and model on this workspace
(W/experiments/runner/durations.json, updated after every run); failing that, the figure shipped
for the embedded tiny models on 2 CPU cores (runner/typical_durations.json, copies of that file
from measured runs of `--jobs reproduce` on the default and on `tiny-organism`), scaled by how this machine's runs so far compare with
the shipped figures. Runs already done with unchanged prerequisites are expected to be skipped.
"""
import time
from pathlib import Path

from runner.files import atomic_write_json, read_json

TYPICAL = Path(__file__).with_name("typical_durations.json")


def duration_key(run) -> str:
    return f"{run.name}|{run.model.tag}" if run.model is not None else run.name


def clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    def __init__(self, plan, executor, log):
        self.plan, self.executor, self.log = plan, executor, log
        self.history_path = executor.workspace.runner_logs / "durations.json"
        self.history = self._load(self.history_path)
        self.typical = self._load(TYPICAL)
        self.started = time.time()
        self.will_run = executor.runs_to_execute(plan)  # the others are skipped as done
        self.measured, self.typical_of_measured = 0.0, 0.0  # for the machine-speed scale

    @staticmethod
    def _load(path) -> dict:
        try:
            return read_json(path)
        except (FileNotFoundError, ValueError):
            return {}

    def expected(self, planned):
        """Seconds this run should take (0 if it will be skipped); None if never timed anywhere."""
        if planned.run not in self.will_run:
            return 0.0
        key = duration_key(planned.run)
        if key in self.history:
            return self.history[key]
        if key in self.typical:
            # seconds-long runs say little about the machine: scale once a minute of shipped time is measured
            scale = self.measured / self.typical_of_measured if self.typical_of_measured >= 60 else 1.0
            return self.typical[key] * scale
        return None

    def start(self, index: int) -> None:
        planned = self.plan[index]
        expected = self.expected(planned)
        hint = f" (expected ~{clock(expected)})" if expected else ""
        self.log.info("[%d/%d] start %s%s", index + 1, len(self.plan), planned.run.label, hint)

    def finish(self, index: int, outcome) -> None:
        if outcome.state == "done":
            key = duration_key(outcome.run)
            if key in self.typical:
                self.measured += outcome.duration_s
                self.typical_of_measured += self.typical[key]
            self.history[key] = round(outcome.duration_s, 1)
            atomic_write_json(self.history_path, self.history)
        remaining = [self.expected(p) for p in self.plan[index + 1:]]
        known = sum(r for r in remaining if r is not None)
        unknown = sum(r is None for r in remaining)
        estimate = (" + ".join(([f"~{clock(known)} left"] if known or not unknown else [])
                               + ([f"{unknown} run(s) never timed"] if unknown else [])) if remaining else "all done")
        what = "skipped (done before)" if outcome.state == "cached" else f"{outcome.state} in {clock(outcome.duration_s)}"
        self.log.info("[%d/%d] %s %s | elapsed %s | %s", index + 1, len(self.plan), outcome.run.label, what,
                      clock(time.time() - self.started), estimate)



def item_bar(label: str, unit: str = "item"):
    """A tqdm bar for a loop inside one run: update(done, total) moves it (total may change)."""
    from tqdm.auto import tqdm
    bar = tqdm(desc=label, unit=unit, dynamic_ncols=True)

    def update(done, total):
        bar.total = total
        bar.update(done - bar.n)
        if done == total:
            bar.close()
    return update
