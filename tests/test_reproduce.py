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


class ReproducePlanTest(unittest.TestCase):
    """What `--jobs reproduce` plans, on the tiny default and on a locally saved (non-embedded) model."""

    @classmethod
    def setUpClass(cls):
        from models import ensure_model, load_model, resolve_model
        from runner.registry import discover
        cls.tmp = tempfile.TemporaryDirectory()
        cls.transformers = Path(cls.tmp.name) / "transformers"
        tiny = resolve_model("tiny", cls.transformers)
        ensure_model(tiny)
        model, tokenizer = load_model(tiny.path)
        model.save_pretrained(cls.transformers / "local-llama")  # a real model folder, as users save theirs
        tokenizer.save_pretrained(cls.transformers / "local-llama")
        cls.registry = discover()

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def plan(self, model_name, overrides=None):
        from models import resolve_model
        from runner.plan import build_plan
        model = resolve_model(model_name, self.transformers)
        return build_plan(self.registry, self.registry.resolve(["reproduce"]), model, [1], overrides or {})

    def test_every_setting_at_every_seed_then_the_report(self):
        plan = self.plan("tiny")
        study = plan[-1]
        self.assertEqual(study.run.name, "reproduce_study")
        read = sorted(r.label for r in study.prerequisites)
        for setting in ("spouses", "samedoc"):
            for job in ("finetune", "evaluate_twohop"):
                self.assertEqual([l for l in read if l.startswith(f"{job}_{setting} ")],
                                 [f"{job}_{setting} [tiny, seed {s}]" for s in (1, 2, 3)])
        self.assertIn("in_context_nocot [tiny]", read)
        self.assertIn("evaluate_twohop_universities [tiny, seed 1]", read)
        self.assertEqual(sum(p.run.name == "finetune_base" for p in plan), 1)
        everything = self.plan("tiny", {"all_entity_types": "true", "seeds": "[4, 5]"})
        labels = {p.run.label for p in everything}
        self.assertEqual(sum(l.startswith("evaluate_twohop_") and "seed 1]" in l for l in labels), 20)
        self.assertIn("finetune_spouses [tiny, seed 5]", labels)
        self.assertNotIn("finetune_spouses [tiny, seed 1]", labels)

    def test_a_local_model_gets_the_reference_recipe(self):
        configs = {p.run.label: p.config for p in self.plan("local-llama")}
        spouses = configs["finetune_spouses [local-llama, seed 2]"]
        self.assertEqual((spouses["lr"], spouses["epochs"], spouses["batch_size"]), (1e-5, 1, 64))
        self.assertEqual(configs["finetune_universities [local-llama, seed 1]"]["lr"], 7.5e-7)
        tiny = {p.run.label: p.config for p in self.plan("tiny")}
        self.assertEqual(tiny["finetune_spouses [tiny, seed 2]"]["lr"], 3e-3)

    def test_the_organism_is_the_default_model_pretrained_with_its_drills(self):
        """`tiny-organism`: the default's weights and tokenizer before training, the same study plan (3 seeds
        of separate and same document, in context, universities), and only its base's recipe differs."""
        from models import ensure_model, resolve_model
        from twohop.training.recipes import ORGANISM_BASE
        organism, tiny = (resolve_model(name, self.transformers) for name in ("tiny-organism", "tiny"))
        ensure_model(organism)
        for name in ("model.safetensors", "tokenizer.json"):
            self.assertEqual((organism.path / name).read_bytes(), (tiny.path / name).read_bytes(), name)
        plans = {name: {p.run.label.replace(name, "MODEL"): p.config for p in self.plan(name)}
                 for name in ("tiny", "tiny-organism")}
        self.assertEqual(sorted(plans["tiny"]), sorted(plans["tiny-organism"]))
        base = "finetune_base [MODEL]"
        self.assertEqual({k: plans["tiny-organism"][base][k] for k in ORGANISM_BASE}, ORGANISM_BASE)
        self.assertEqual(plans["tiny"][base]["drill_phases"], [])
        different = {label for label in plans["tiny"] if plans["tiny"][label] != plans["tiny-organism"][label]}
        self.assertEqual(different, {base})
        self.assertEqual(plans["tiny-organism"]["reproduce_study [MODEL]"]["seeds"], [1, 2, 3])

    def test_bad_settings_are_one_clear_error(self):
        from runner.errors import UserError
        for key, value, named in (("semi_synthetic_types", "[universities, dragons]", "dragons"),
                                  ("settings", "[spouses, telepathy]", "telepathy"), ("seeds", "[]", "seeds")):
            with self.assertRaises(UserError) as caught:
                self.plan("tiny", {key: value})
            self.assertIn(named, str(caught.exception))


class FindingsTest(unittest.TestCase):
    def test_separate_documents_cot_is_tested_against_chance_not_a_fixed_bar(self):
        """The paper's claim is that the chain composes the facts: 46.7% of 210 against 2% chance holds
        (z = +46), and 3.3% does not (z = +1.4), whatever bar a particular machine's model clears."""
        from twohop.reports.study import findings
        separate = {"cot": 0.467, "chance": 0.02, "n": 210, "z_vs_chance": 1.38, "acc_a": 1.0, "acc_b": 0.93}
        (cot,) = [f for f in findings({"spouses": separate}) if "CoT above chance" in f["claim"]]
        self.assertTrue(cot["holds"])
        self.assertIn("z = +46", cot["measured"])
        (cot,) = [f for f in findings({"spouses": {**separate, "cot": 0.033}}) if "CoT above chance" in f["claim"]]
        self.assertFalse(cot["holds"])

    def test_in_context_is_tested_against_a_random_city_from_the_prompt(self):
        """With 10 distractor triplets a model that names any birthplace in its prompt gets about 1/10: 6.2%
        no-CoT over 210 questions is above 1/50 chance but not above that; 83.3% CoT is."""
        from twohop.reports.study import findings
        from twohop.stats import z_vs_chance
        in_context = {"nocot": 0.062, "cot": 0.833, "chance": 0.091, "cot_chance": 0.092, "n": 210, "first_hop": 0.857,
                      "z_vs_chance": z_vs_chance(0.062, 0.091, 210)}
        nocot, cot = [f for f in findings({"in_context": in_context}) if f["claim"].startswith("in context")]
        self.assertEqual(nocot["claim"], "in context: no-CoT above a random city from the prompt (z > 2)")
        self.assertFalse(nocot["holds"])
        self.assertTrue(cot["holds"])
        self.assertIn("the chain names the bridge in 85.7%", cot["measured"])


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
            self.assertEqual(sorted(rows), ["in_context", "samedoc", "semi_synthetic", "spouses"])

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
            # ... tested against the better of a uniform guess and a random city from the prompt (1/50 and 9.9% in the study).
            (nocot,), (cot,) = (read(exp / f"in_context/{style}/tiny-h128-l2/results.json")["settings"].values()
                                for style in ("nocot", "cot"))
            for key, setting in (("chance", nocot), ("cot_chance", cot)):
                self.assertAlmostEqual(rows["in_context"][key], max(setting["chance"], setting["prompt_city_chance"]["mean"]))
            self.assertGreater(rows["in_context"]["chance"], rows["in_context"]["uniform_chance"])  # this small world: 13% vs 8%
            # Semi-synthetic: the mean over the entity type's no-CoT tests.
            universities = read(exp / "evaluate_twohop/universities/tiny-h128-l2/seed_1/results.json")["tests"]
            nocot = [t["correct"] for name, t in universities.items() if name.startswith("test/") and name.endswith("_nocot")]
            self.assertAlmostEqual(rows["semi_synthetic"]["nocot"], statistics.fmean(nocot))
            self.assertTrue((study / "semi_synthetic/summary.md").is_file())

            # report.md shows the same numbers; the figures are real PNGs; every finding is checked.
            markdown = (study / "report.md").read_text()
            for row in rows.values():
                self.assertIn(f"| {row['setting']} | {row['runs']} | {row['n']} | {100 * row['nocot']:.1f}% |", markdown)
            self.assertEqual(len(report["findings"]), 8)
            self.assertTrue(report["findings"][-1]["claim"].startswith("semi-synthetic: no-CoT loss gap"))
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
