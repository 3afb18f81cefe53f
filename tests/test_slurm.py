"""`--launcher slurm` against a real single-node SLURM cluster started for the test (skipped, with
the reason, where one cannot be installed or started; TWOHOP_SKIP_SLOW=1 skips it too).

A chain of data -> the tiny model's pretraining -> fine-tuning (a few steps) -> evaluation goes
through the cluster in dependency order and gives the same results as a local run; a second
invocation submits nothing that is done or still queued; a failing stage leaves its dependent
cancelled by SLURM and reported by the runner."""
import json
import os
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

from tests.fixtures.slurm_cluster import Cluster
from tests.fixtures.train_small import SMALL_WORLD

ROOT = Path(__file__).resolve().parents[1]
FEW_STEPS = ["--set", "finetune.max_steps=3", "--set", "finetune.eval_subsample=8",
             "--set", "finetune_base.base_people=5", "--set", "finetune_base.copy_rows=20",
             "--set", "finetune_base.in_context_per_round=4", "--set", "evaluate_twohop.max_rows=4",
             "--set", "evaluate_twohop.memorisation_rows=4", "--set", "evaluate_twohop.bootstrap=20"]
CHAIN = ["--jobs", "evaluate_twohop_spouses", *SMALL_WORLD, *FEW_STEPS]


@unittest.skipIf(os.environ.get("TWOHOP_SKIP_SLOW") == "1", "slow SLURM test (TWOHOP_SKIP_SLOW=1)")
class SlurmLauncherTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.cluster = Cluster(Path(cls.tmp.name) / "cluster")
        why = cls.cluster.start()
        if why:
            cls.cluster.stop()
            cls.tmp.cleanup()
            raise unittest.SkipTest(f"no SLURM cluster here: {why}")
        cls.env = {**os.environ, **cls.cluster.env}

    @classmethod
    def tearDownClass(cls):
        cls.cluster.stop()
        cls.tmp.cleanup()

    def runner(self, w: Path, *args, env=None):
        return subprocess.run([sys.executable, "runner/main.py", "--workspace_path", str(w), *args], cwd=ROOT,
                              capture_output=True, text=True, env=env or self.env)

    def status(self, w: Path, path: str) -> dict:
        return json.loads((w / "experiments" / path / "status.json").read_text())

    def test_chain_runs_in_order_matches_a_local_run_and_is_not_resubmitted(self):
        w, local = Path(self.tmp.name) / "slurm_w", Path(self.tmp.name) / "local_w"
        result = self.runner(w, *CHAIN, "--launcher", "slurm", "--wait")
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertEqual(result.stderr.count("submitted "), 5)
        self.assertEqual(result.stderr.count(" COMPLETED"), 5)
        submitted = json.loads(next((w / "experiments/runner").glob("slurm-*/submitted.json")).read_text())
        self.assertEqual(len(submitted), 5)
        order = ["generate_data/spouses", "finetune/base/tiny-h128-l2", "finetune/spouses/tiny-h128-l2/seed_1",
                 "evaluate_twohop/spouses/tiny-h128-l2/seed_1"]
        for before, after in zip(order, order[1:]):  # afterok: each started after its prerequisite ended
            self.assertGreaterEqual(self.status(w, after)["started"], self.status(w, before)["ended"])
        script = next((w / "experiments/runner").glob("slurm-*/evaluate_twohop_spouses-*.sbatch")).read_text()
        self.assertIn(f"#SBATCH --dependency=afterok:{submitted['finetune_spouses [tiny, seed 1]']}", script)

        self.assertEqual(self.runner(local, *CHAIN).returncode, 0)
        results = "evaluate_twohop/spouses/tiny-h128-l2/seed_1"
        for name in ("predictions.jsonl",):
            self.assertEqual((w / "experiments" / results / name).read_text(),
                             (local / "experiments" / results / name).read_text())
        ours, theirs = (json.loads((x / "experiments" / results / "results.json").read_text()) for x in (w, local))
        self.assertEqual(ours["headline"], theirs["headline"])

        again = self.runner(w, *CHAIN, "--launcher", "slurm")  # everything is done: nothing to submit
        self.assertEqual(again.returncode, 0, again.stderr[-2000:])
        self.assertNotIn("submitted ", again.stderr)
        self.assertEqual(again.stderr.count("not submitted: "), 5)

    def test_queued_jobs_are_not_submitted_twice(self):
        w = Path(self.tmp.name) / "queued_w"
        first = self.runner(w, "--jobs", "generate_data_spouses", "generate_data_natural_facts", "--launcher", "slurm",
                            "--set", "slurm.extra=[--begin=now+30]")  # held in the queue for 30 s
        self.assertEqual(first.returncode, 0, first.stderr[-2000:])
        second = self.runner(w, "--jobs", "generate_data_spouses", "generate_data_natural_facts", "--launcher", "slurm")
        self.assertEqual(second.returncode, 0, second.stderr[-2000:])
        self.assertEqual(second.stderr.count("already queued or running as job"), 2)
        self.assertNotIn("submitted ", second.stderr.replace("not submitted", ""))
        ids = json.loads((w / "experiments/runner/slurm_jobs.json").read_text()).values()
        subprocess.run(["scancel", *ids], env=self.env, check=True)

    def test_failing_stage_cancels_its_dependents_and_is_reported(self):
        w = Path(self.tmp.name) / "failing_w"
        # A data file that only the run can look for (it is relative to the generated data folder).
        result = self.runner(w, *CHAIN, "--set",
                             "finetune_spouses.train_datasets=[{name: gone, dataset_file: train/missing.jsonl}]",
                             "--launcher", "slurm", "--wait")
        self.assertEqual(result.returncode, 1, result.stderr[-3000:])
        report = result.stderr.split("did not complete")[0]
        self.assertRegex(report, r"finetune_spouses \[tiny, seed 1\]\s+job \d+\s+FAILED")
        self.assertRegex(report, r"evaluate_twohop_spouses \[tiny, seed 1\]\s+job \d+\s+CANCELLED")
        self.assertIn("2 of 5 SLURM jobs did not complete", result.stderr)
        self.assertFalse((w / "experiments/evaluate_twohop").exists())  # cancelled before it started
        log = next((w / "experiments/runner").glob("slurm-*/finetune_spouses-*.out")).read_text()
        self.assertIn("train/missing.jsonl does not exist", log)

    def test_missing_sbatch_and_a_refused_submission_are_clear_errors(self):
        w = Path(self.tmp.name) / "errors_w"
        no_slurm = {**self.env, "PATH": os.path.dirname(sys.executable)}
        result = self.runner(w, "--jobs", "generate_data_spouses", "--launcher", "slurm", env=no_slurm)
        self.assertEqual(result.returncode, 2)
        self.assertIn("sbatch is not on PATH", result.stderr)
        refused = self.runner(w, "--jobs", "generate_data_spouses", "--launcher", "slurm",
                              "--set", "slurm.partition=no_such_partition")
        self.assertEqual(refused.returncode, 2)
        self.assertRegex(refused.stderr, r"sbatch refused generate_data_spouses\.sbatch: .*[Ii]nvalid partition")
        self.assertEqual(self.runner(w, "--jobs", "generate_data_spouses", "--set", "slurm.gpus=1").returncode, 2)


if __name__ == "__main__":
    unittest.main()
