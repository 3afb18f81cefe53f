"""Slow end to end: the runner chains data, the tiny model's pretraining, fine-tuning variants and
evaluation on a small world, with real training (few steps). Runs in CI; skip locally with
TWOHOP_SKIP_SLOW=1."""
import json
import os
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

from tests.fixtures.train_small import SMALL_WORLD

ROOT = Path(__file__).resolve().parents[1]
FEW_STEPS = ["--set", "finetune.max_steps=6", "--set", "finetune.eval_subsample=16",
             "--set", "finetune_base.base_people=20", "--set", "finetune_base.copy_rows=50",
             "--set", "finetune_base.in_context_per_round=10", "--set", "evaluate_twohop.max_rows=8",
             "--set", "evaluate_twohop.memorisation_rows=4", "--set", "evaluate_twohop.bootstrap=50",
             "--set", "in_context.max_rows=4", "--set", "frontier_eval.max_chains=3"]


@unittest.skipIf(os.environ.get("TWOHOP_SKIP_SLOW") == "1", "slow end-to-end test (TWOHOP_SKIP_SLOW=1)")
class EndToEndTest(unittest.TestCase):
    def test_study_variants_train_and_evaluate_through_the_runner(self):
        jobs = ["finetune_spouses", "evaluate_twohop_spouses", "finetune_aux_logit", "finetune_aux_cosine",
                "finetune_samedoc", "finetune_universities", "evaluate_twohop_universities", "in_context",
                "save_hidden_states_analysis_universities", "frontier_eval_local"]
        with tempfile.TemporaryDirectory() as tmp:
            w = Path(tmp) / "w"
            result = subprocess.run([sys.executable, "runner/main.py", "--workspace_path", str(w), "--jobs", *jobs,
                                     *SMALL_WORLD, *FEW_STEPS], cwd=ROOT, capture_output=True, text=True)
            self.assertEqual(result.returncode, 0, result.stderr[-3000:])
            exp = w / "experiments"
            for name in ("spouses", "aux_logit", "aux_cosine", "samedoc", "universities"):
                run = exp / "finetune" / name / "tiny-h128-l2" / "seed_1"
                self.assertEqual(json.loads((run / "status.json").read_text())["state"], "done", name)
                self.assertTrue((run / "model" / "model.safetensors").is_file(), name)
            for variant in ("aux_logit", "aux_cosine"):
                lines = (exp / "finetune" / variant / "tiny-h128-l2/seed_1/metrics.jsonl").read_text().splitlines()
                aux = [json.loads(l)["aux_loss"] for l in lines if '"aux_loss"' in l]
                self.assertTrue(aux and all(v > 0 for v in aux), variant)
            for name in ("spouses", "universities"):
                results = json.loads((exp / "evaluate_twohop" / name / "tiny-h128-l2/seed_1/results.json").read_text())
                self.assertTrue(results["headline"], name)
            # The cross-type report reads real semi-synthetic results (here one type).
            from twohop.reports.evaluation import write_semi_synthetic_report
            universities = json.loads((exp / "evaluate_twohop/universities/tiny-h128-l2/seed_1/results.json").read_text())
            summary = write_semi_synthetic_report({"universities": universities}, Path(tmp), "semi-synthetic")
            self.assertEqual(summary["types"], 1)
            self.assertGreaterEqual(summary["attributes"], 2)
            self.assertEqual((Path(tmp) / "accuracy_by_type.png").read_bytes()[:4], b"\x89PNG")

            # in_context: every (style, distractors) setting over three data seeds, table and plot from the results.
            sweep = exp / "in_context/distractor_sweep/tiny-h128-l2"
            results = json.loads((sweep / "results.json").read_text())
            self.assertEqual(sorted(results["settings"]), sorted(f"{s}/{n}" for s in ("cot", "nocot") for n in (0, 1, 3, 10, 30)))
            predictions = (sweep / "predictions.jsonl").read_text().splitlines()
            self.assertEqual(len(predictions), 2 * 5 * 3 * 4)
            summary = (sweep / "summary.md").read_text()
            for setting in results["settings"].values():
                per_seed = [s["accuracy"] for s in setting["per_seed"].values()]
                self.assertAlmostEqual(setting["accuracy"]["mean"], sum(per_seed) / 3)
                self.assertIn(f"| {setting['n_distractors']} | {setting['n_facts']} | 4 | {setting['accuracy']['mean']:.3f}",
                              summary)
            self.assertEqual((sweep / "accuracy_vs_distractors.png").read_bytes()[:4], b"\x89PNG")
            # A random birthplace from the prompt: the only one with no distractors, one of two with one.
            prompt_city = {s["n_distractors"]: s["prompt_city_chance"]["mean"] for s in results["settings"].values()}
            self.assertEqual((prompt_city[0], prompt_city[1]), (1.0, 0.5))
            self.assertGreaterEqual(prompt_city[10], 1 / 11)
            self.assertTrue((exp / "in_context/nocot/tiny-h128-l2/results.json").is_file())

            # save_hidden_states: every family saved and readable; the analysis reads the evaluation's accuracy.
            from twohop.interp.hidden_states import HiddenStates
            saved = exp / "save_hidden_states/universities/tiny-h128-l2"
            self.assertEqual(HiddenStates(saved / "e2_r2").layer(1).shape, (80, 128))  # 20 entities x 4 attributes
            self.assertEqual(HiddenStates(saved / "e2_tell").layer(2, "span").shape, (20, 128))
            analysis = json.loads((exp / "save_hidden_states/analysis_universities/tiny-h128-l2/seed_1/analysis.json").read_text())
            nocot = {t[5:-6]: s["correct"] for t, s in universities["tests"].items() if t.endswith("_nocot")}
            self.assertEqual(analysis["accuracy"], {f"universities/{a}": v for a, v in nocot.items()})
            self.assertEqual(len(analysis["pairs"]["e2_r2->e3_tell"]["by_layer"]), 3)
            self.assertEqual(analysis["logit_lens"]["n"], 79)  # 20 people x 4 attributes, less Penn's disputed founding
            table = (exp / "save_hidden_states/analysis_universities/tiny-h128-l2/seed_1/analysis.md").read_text()
            for row in analysis["logit_lens"]["by_layer"]:
                self.assertIn(f"| {row['layer']} | {row['median_rank']:.1f} | {row['mean_rank']:.1f} |", table)

            # frontier_eval_local: the tiny model answers all seven tasks of every chain; the table has its row.
            local = exp / "frontier_eval/local/tiny-h128-l2"
            results = json.loads((local / "local_tiny/results.json").read_text())
            self.assertEqual((results["chains"], results["requests"], results["failed"]), (3, 21, 0))
            self.assertIn("| local:tiny | 3 |", (local / "summary.md").read_text())
            self.assertEqual((local / "cot_vs_nocot.png").read_bytes()[:4], b"\x89PNG")

            # Seeds: a summary over exactly the seeds asked for, inside its own run folder, also after one
            # seed is rerun with --force.
            # Only the overrides of the jobs these invocations plan (a --set naming no planned key is an error).
            training = [a for pair in zip(FEW_STEPS[::2], FEW_STEPS[1::2]) if pair[1].split(".")[0] in
                        ("finetune", "finetune_base", "evaluate_twohop") for a in pair]

            def over_seeds(*extra):
                run = subprocess.run([sys.executable, "runner/main.py", "--workspace_path", str(w), "--seeds", "1", "2", "3",
                                      *extra, *SMALL_WORLD, *training], cwd=ROOT, capture_output=True, text=True)
                self.assertEqual(run.returncode, 0, run.stderr[-3000:])
                return json.loads((exp / "evaluate_twohop/spouses_over_seeds/tiny-h128-l2/seeds_summary.json").read_text())

            summary = over_seeds("--jobs", "evaluate_twohop_spouses_over_seeds")
            values = [json.loads((exp / f"evaluate_twohop/spouses/tiny-h128-l2/seed_{s}/results.json").read_text())
                      ["headline"]["acc_2hop_nocot"] for s in (1, 2, 3)]
            self.assertEqual(summary["seeds"], [1, 2, 3])
            self.assertEqual(summary["metrics"]["acc_2hop_nocot"]["values"], values)
            forced = subprocess.run([sys.executable, "runner/main.py", "--workspace_path", str(w), "--jobs",
                                     "evaluate_twohop_spouses", "--seeds", "2", "--force", *SMALL_WORLD, *training],
                                    cwd=ROOT, capture_output=True, text=True)
            self.assertEqual(forced.returncode, 0, forced.stderr[-3000:])
            summary = over_seeds("--jobs", "evaluate_twohop_spouses_over_seeds")
            self.assertEqual((summary["seeds"], summary["metrics"]["acc_2hop_nocot"]["n"]), ([1, 2, 3], 3))

            # A second invocation finds everything done and skips it.
            again = subprocess.run([sys.executable, "runner/main.py", "--workspace_path", str(w), "--jobs", *jobs,
                                    *SMALL_WORLD, *FEW_STEPS], cwd=ROOT, capture_output=True, text=True)
            self.assertEqual(again.returncode, 0, again.stderr[-3000:])
            self.assertNotIn(" done ", again.stderr.split("summary:")[-1])
