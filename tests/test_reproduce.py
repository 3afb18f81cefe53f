"""Slow: `--jobs reproduce` on a small world with few training steps, two seeds and one entity type;
the report's numbers must be the evaluation results it read. Runs in CI; TWOHOP_SKIP_SLOW=1 skips it."""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

from tests.fixtures.train_small import SMALL_WORLD

ROOT = Path(__file__).resolve().parents[1]
REDUCED = ["--set", "reproduce.seeds=[1, 2]", "--set", "finetune.max_steps=4", "--set", "finetune.eval_subsample=16",
           "--set", "finetune_base.base_people=20", "--set", "finetune_base.copy_rows=50",
           "--set", "finetune_base.in_context_per_round=10", "--set", "evaluate_twohop.max_rows=8",
           "--set", "evaluate_twohop.memorisation_rows=4", "--set", "evaluate_twohop.bootstrap=50",
           "--set", "in_context.max_rows=4"]


def read(path):
    return json.loads(Path(path).read_text())


@unittest.skipIf(os.environ.get("TWOHOP_SKIP_SLOW") == "1", "slow end-to-end test (TWOHOP_SKIP_SLOW=1)")
class ReproduceTest(unittest.TestCase):
    def test_reduced_study_reports_exactly_what_the_evaluations_measured(self):
        with tempfile.TemporaryDirectory() as tmp:
            w = Path(tmp) / "w"
            command = [sys.executable, "runner/main.py", "--workspace_path", str(w), "--jobs", "reproduce",
                       *SMALL_WORLD, *REDUCED]
            result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            self.assertEqual(result.returncode, 0, result.stderr[-3000:])
            exp = w / "experiments"
            study = exp / "reproduce/study/tiny-h128-l2"
            report = read(study / "report.json")
            rows = report["settings"]
            self.assertEqual(list(rows), ["spouses", "samedoc", "in_context", "semi_synthetic"])

            # Fine-tuning settings: mean and s.e. over the two seeds' evaluations.
            for setting in ("spouses", "samedoc"):
                results = [read(exp / f"evaluate_twohop/{setting}/tiny-h128-l2/seed_{s}/results.json") for s in (1, 2)]
                for key, metric in (("nocot", "acc_2hop_nocot"), ("cot", "acc_2hop_cot"), ("chance", "chance")):
                    values = [r["headline"][metric] for r in results]
                    self.assertAlmostEqual(rows[setting][key], statistics.fmean(values), msg=f"{setting} {key}")
                self.assertAlmostEqual(rows[setting]["nocot_se"], statistics.stdev(
                    [r["headline"]["acc_2hop_nocot"] for r in results]) / 2 ** 0.5)
                self.assertEqual(rows[setting]["n"], sum(r["tests"]["test/2hop_nocot"]["n"] for r in results))
                self.assertEqual(len(rows[setting]["sources"]), 2)
            # In context: the in_context runs' own means over data seeds.
            for style in ("nocot", "cot"):
                (setting,) = read(exp / f"in_context/{style}/tiny-h128-l2/results.json")["settings"].values()
                self.assertAlmostEqual(rows["in_context"][style], setting["accuracy"]["mean"])
            # Semi-synthetic: the mean over the entity type's no-CoT tests.
            universities = read(exp / "evaluate_twohop/universities/tiny-h128-l2/seed_1/results.json")["tests"]
            nocot = [t["correct"] for name, t in universities.items() if name.startswith("test/") and name.endswith("_nocot")]
            self.assertAlmostEqual(rows["semi_synthetic"]["nocot"], statistics.fmean(nocot))
            self.assertTrue((study / "semi_synthetic/summary.md").is_file())

            # report.md shows the same numbers; the figures are real PNGs; every finding is checked.
            markdown = (study / "report.md").read_text()
            for row in rows.values():
                self.assertIn(f"| {row['setting']} | {row['runs']} | {row['n']} | {100 * row['nocot']:.1f}% |", markdown)
            self.assertEqual(len(report["findings"]), 6)
            for name in ("figure1.png", "loss_gap.png", "semi_synthetic/accuracy_by_type.png"):
                self.assertEqual((study / name).read_bytes()[:4], b"\x89PNG", name)
            # One progress line per run, the last with nothing left.
            self.assertRegex(result.stderr, r"\[\d+/\d+\] reproduce_study \[tiny\] done in \S+ \| elapsed \S+ \| all done")

            # The same command again runs nothing.
            again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            self.assertEqual(again.returncode, 0, again.stderr[-3000:])
            self.assertNotIn(" done in ", again.stderr)
            self.assertIn("reproduce_study [tiny] skipped (done before)", again.stderr)


if __name__ == "__main__":
    unittest.main()
