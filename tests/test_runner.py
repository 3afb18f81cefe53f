"""The runner on a toy registry: names, plans, skipping, --force, SIGKILL, failures, --set."""
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path

from runner.errors import UserError
from runner.main import main
from tests.fixtures.toy_registry import toy_registry

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "toy_registry.py"


def run_cli(*argv):
    """Run the CLI in-process on the toy registry; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv), registry=toy_registry())
    return code, out.getvalue(), err.getvalue()


def status(run_dir):
    return json.loads((Path(run_dir) / "status.json").read_text())


class RunnerTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.w = Path(self.tmp.name) / "w"
        self.exp = self.w / "experiments"

    def tearDown(self):
        self.tmp.cleanup()

    def cli(self, *argv):
        return run_cli("--workspace_path", str(self.w), *argv)

    # ---- names -------------------------------------------------------------------------------
    def test_resolves_jobs_subjobs_and_underscored_names(self):
        registry = toy_registry()
        self.assertEqual([s.full_name for s in registry.resolve(["alpha"])], ["alpha_make", "alpha_slow"])
        self.assertEqual([s.full_name for s in registry.resolve(["two_words_x_y"])], ["two_words_x_y"])
        self.assertEqual([s.full_name for s in registry.resolve(["beta_use", "alpha", "alpha_make"])],
                         ["beta_use", "alpha_make", "alpha_slow"])

    def test_unknown_name_suggests_and_runs_nothing(self):
        code, _, err = self.cli("--jobs", "alpha_make", "alpha_mak")
        self.assertEqual(code, 2)
        self.assertIn("'alpha_mak'", err)
        self.assertIn("did you mean alpha_make", err)
        self.assertEqual(len(err.strip().splitlines()), 1)
        self.assertFalse((self.exp / "alpha").exists())

    def test_list_shows_every_subjob_and_requirements(self):
        code, out, _ = run_cli("--list")
        self.assertEqual(code, 0)
        for name in ("alpha_make", "alpha_slow", "beta_use", "gamma_fail", "two_words_x_y"):
            self.assertIn(name, out)
        self.assertIn("requires: alpha_make", out)

    # ---- plans -------------------------------------------------------------------------------
    def test_dry_run_adds_prerequisites_in_order_and_runs_nothing(self):
        code, out, _ = self.cli("--jobs", "beta_use", "two_words_x_y", "--dry_run", "--seeds", "1", "2")
        self.assertEqual(code, 0, out)
        lines = [l for l in out.splitlines() if l.strip()[:2].rstrip(".").isdigit()]
        self.assertEqual(len(lines), 4, out)
        self.assertIn("alpha_make  (prerequisite", lines[0])
        self.assertIn("beta_use  (requested", lines[1])
        self.assertIn("two_words_x_y [seed 1]", lines[2])
        self.assertIn("two_words_x_y [seed 2]", lines[3])
        self.assertFalse((self.exp / "alpha").exists())

    def test_prerequisites_run_once_and_seeds_fan_out(self):
        code, _, err = self.cli("--jobs", "two_words_x_y", "--seeds", "1", "2")
        self.assertEqual(code, 0, err)
        for seed in (1, 2):
            self.assertEqual((self.exp / "two_words" / "x_y" / f"seed_{seed}" / "seed.txt").read_text(), f"{seed} 0.5")
        self.assertEqual(status(self.exp / "alpha" / "make")["state"], "done")
        self.assertEqual(err.count("run alpha_make ->"), 1)

    def test_a_sub_job_reads_a_seeded_one_at_the_seeds_its_config_names(self):
        code, _, err = self.cli("--jobs", "two_words_gather", "--set", "seeds=[1, 3]")
        self.assertEqual(code, 0, err)
        self.assertEqual((self.exp / "two_words/gather/gathered.txt").read_text(), "1 0.5 | 3 0.5")
        self.assertFalse((self.exp / "two_words/x_y/seed_2").exists())
        self.assertEqual(err.count("run alpha_make ->"), 1)
        # One progress line per run, with elapsed time; the last one says nothing is left.
        self.assertIn("[4/4] two_words_gather done in 0m00s | elapsed", err)
        self.assertRegex(err, r"\[1/4\] alpha_make done in \S+ \| elapsed \S+ \| 3 run\(s\) never timed")
        # The measured durations make the next plan's estimate.
        code, _, err = self.cli("--jobs", "two_words_gather", "--set", "seeds=[1, 3, 5]", "--dry_run")
        self.assertIn("two_words_x_y [seed 5]", err + _)
        self.assertTrue((self.exp / "runner/durations.json").is_file())

    # ---- skipping and forcing ------------------------------------------------------------------
    def test_done_run_is_skipped_force_reruns_and_new_inputs_propagate(self):
        make_dir, use_dir = self.exp / "alpha" / "make", self.exp / "beta" / "use"
        self.assertEqual(self.cli("--jobs", "beta_use")[0], 0)
        first_make, first_use = status(make_dir)["run_id"], status(use_dir)["run_id"]
        self.assertEqual((use_dir / "derived.txt").read_text(), "HELLOHELLOHELLO")
        for name in ("config.json", "status.json", "log.txt", "metrics.json"):
            self.assertTrue((make_dir / name).is_file(), name)
        # What else the figures depend on: the CPU the kernels were picked for, and the threads.
        machine = json.loads((make_dir / "config.json").read_text())["machine"]
        self.assertEqual(machine["usable_cpus"], len(os.sched_getaffinity(0)))
        self.assertLessEqual(set(machine["cpu_features"]), {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
        self.assertTrue(machine["cpu"])

        code, _, err = self.cli("--jobs", "beta_use")
        self.assertEqual(code, 0)
        self.assertIn("skip alpha_make: done with the same inputs", err)
        self.assertEqual(status(use_dir)["run_id"], first_use)

        # --force reruns the named sub-job only; its consumer then sees a new input and reruns.
        self.assertEqual(self.cli("--jobs", "alpha_make", "--force")[0], 0)
        self.assertNotEqual(status(make_dir)["run_id"], first_make)
        self.assertEqual(self.cli("--jobs", "beta_use")[0], 0)
        self.assertNotEqual(status(use_dir)["run_id"], first_use)

        # A changed config changes the fingerprint, so the run is redone with it.
        self.assertEqual(self.cli("--jobs", "beta_use", "--set", "text=ab", "--set", "repeat=2")[0], 0)
        self.assertEqual((use_dir / "derived.txt").read_text(), "ABAB")
        self.assertEqual(json.loads((make_dir / "config.json").read_text())["config"]["repeat"], 2)

    def test_dry_run_says_what_a_real_run_will_do(self):
        """A done run whose inputs changed shows as 'will run again', never just 'done' (the plan uses the
        executor's own test), and so does its consumer; an unchanged one 'will be skipped'."""
        self.assertEqual(self.cli("--jobs", "beta_use")[0], 0)
        _, out, _ = self.cli("--jobs", "beta_use", "--dry_run")
        self.assertIn("alpha_make  (prerequisite; now: done, will be skipped)", out)
        _, out, _ = self.cli("--jobs", "beta_use", "--set", "repeat=2", "--dry_run")
        self.assertIn("alpha_make  (prerequisite; now: done, will run again: its inputs changed)", out)
        self.assertIn("beta_use  (requested; now: done, will run again: its inputs changed", out)
        _, out, _ = self.cli("--jobs", "beta_use", "--force", "--dry_run")
        self.assertIn("beta_use  (requested; now: done, forced: will run again", out)
        code, _, err = self.cli("--jobs", "beta_use", "--set", "repeat=2")
        self.assertEqual(code, 0, err)
        self.assertNotIn("skip alpha_make", err)

    # ---- SIGKILL -----------------------------------------------------------------------------
    def test_sigkill_mid_write_leaves_nothing_final_and_rerun_completes(self):
        run_dir = self.exp / "alpha" / "slow"
        argv = [sys.executable, str(FIXTURE), "--workspace_path", str(self.w), "--jobs", "alpha_slow"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while not (run_dir / "writing.marker").exists():
            self.assertIsNone(proc.poll(), "runner exited before writing began")
            self.assertLess(time.time(), deadline)
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        self.assertEqual(status(run_dir)["state"], "running")
        self.assertFalse((run_dir / "big.txt").exists(), "a killed write must not leave the final file")
        self.assertTrue(list(run_dir.glob(".big.txt.*.tmp")), "the partial write stays in a temporary file")

        result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("(resuming)", result.stderr)
        self.assertEqual(status(run_dir)["state"], "done")
        lines = (run_dir / "big.txt").read_text().splitlines()
        self.assertEqual(lines, [f"line {i:06d}" for i in range(400)])
        self.assertFalse(list(run_dir.glob(".*.tmp")), "stale temporaries are cleaned up")

    # ---- failures -----------------------------------------------------------------------------
    def test_failure_is_isolated_dependents_blocked_and_exit_nonzero(self):
        code, _, err = self.cli("--jobs", "gamma_fail", "gamma_after_fail", "alpha_make")
        self.assertEqual(code, 1)
        fail_dir = self.exp / "gamma" / "fail"
        self.assertEqual(status(fail_dir)["state"], "failed")
        self.assertIn("deliberate failure", status(fail_dir)["error"])
        self.assertIn("Traceback", (fail_dir / "log.txt").read_text())
        self.assertFalse((self.exp / "gamma" / "after_fail" / "status.json").exists())
        self.assertEqual(status(self.exp / "alpha" / "make")["state"], "done")
        summary = err[err.index("summary:"):]
        self.assertRegex(summary, r"gamma_fail\s+failed")
        self.assertRegex(summary, r"gamma_after_fail\s+blocked")
        self.assertIn("reason: prerequisite gamma_fail did not finish", summary)
        self.assertRegex(summary, r"alpha_make\s+done")
        logs = list((self.exp / "runner").glob("*.log"))
        self.assertEqual(len(logs), 1)
        self.assertIn("summary:", logs[0].read_text())

    # ---- --set and --no_deps ------------------------------------------------------------------
    def test_set_typed_nested_and_unknown_keys(self):
        self.assertEqual(self.cli("--jobs", "alpha_make", "--set", "nested.depth=4")[0], 0)
        config = json.loads((self.exp / "alpha" / "make" / "config.json").read_text())["config"]
        self.assertEqual(config["nested"]["depth"], 4)

        code, _, err = self.cli("--jobs", "alpha_make", "--set", "colour=red")
        self.assertEqual(code, 2)
        self.assertIn("colour", err)
        self.assertIn("valid keys: nested, nested.depth, repeat, text", err)

        # A nested config can be set as a whole (YAML); a key it does not declare is refused, never dropped.
        self.assertEqual(self.cli("--jobs", "alpha_make", "--set", "nested={depth: 7}", "--force")[0], 0)
        config = json.loads((self.exp / "alpha" / "make" / "config.json").read_text())["config"]
        self.assertEqual(config["nested"], {"depth": 7})
        code, _, err = self.cli("--jobs", "alpha_make", "--set", "nested={depth: 7, extra: 1}")
        self.assertEqual((code, err.count("\n")), (2, 1))
        self.assertIn("nested: unknown key(s) extra; valid keys: depth", err)

        code, _, err = self.cli("--jobs", "alpha_make", "--set", "repeat=many")
        self.assertEqual(code, 2)
        self.assertIn("--set repeat=many: expected a whole number", err)
        code, _, err = self.cli("--jobs", "alpha_make", "--set", "repeat=0")
        self.assertIn("--set repeat=0: expected a whole number >= 1", err)

    def test_set_scoped_to_a_job_or_sub_job(self):
        code = self.cli("--jobs", "alpha_make", "alpha_slow", "--set", "alpha_make.repeat=5", "--set", "alpha_slow.chunks=3")[0]
        self.assertEqual(code, 0)
        config = lambda name: json.loads((self.exp / "alpha" / name / "config.json").read_text())["config"]
        self.assertEqual((config("make")["repeat"], config("slow")["chunks"]), (5, 3))
        self.assertEqual(self.cli("--jobs", "alpha_make", "--set", "alpha.repeat=6")[0], 0)
        self.assertEqual(config("make")["repeat"], 6)

        code, _, err = self.cli("--jobs", "alpha_make", "alpha_slow", "--set", "alpha_slow.repeat=2")
        self.assertEqual(code, 2)
        self.assertIn("(alpha_slow) has a config key 'repeat'", err)
        self.assertIn("valid keys: chunks, sleep_s", err)

    def test_no_deps_with_missing_input_names_the_producer(self):
        code, _, err = self.cli("--jobs", "beta_use", "--no_deps")
        self.assertEqual(code, 2)
        self.assertIn("needs the outputs of alpha_make", err)
        self.assertIn("--jobs alpha_make", err)
        self.assertFalse((self.exp / "beta").exists())
        self.assertEqual(self.cli("--jobs", "alpha_make")[0], 0)
        self.assertEqual(self.cli("--jobs", "beta_use", "--no_deps")[0], 0)

    def test_registry_rejects_cycles_and_unknown_requirements(self):
        from runner.registry import Job, Registry, SubJob
        with self.assertRaisesRegex(ValueError, "cycle"):
            Registry([Job("a", "", (SubJob("a", "x", "", None, requires=("a_y",)),
                                    SubJob("a", "y", "", None, requires=("a_x",))))])
        with self.assertRaisesRegex(ValueError, "unknown sub-job"):
            Registry([Job("a", "", (SubJob("a", "x", "", None, requires=("b_z",)),))])
        with self.assertRaises(UserError):
            toy_registry().resolve(["zzz"])


if __name__ == "__main__":
    unittest.main()
