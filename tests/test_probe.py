"""Linear probes on planted states, whose answers are known exactly, and `intervene_probe` through the runner.

Planted states: 60 questions about 60 entities (e1), 3 classes of 20; the class is written into
state 2 only (a unit step along its own dimension, over unit-variance noise), every other state is
noise. So a probe split by entity reads it at state 2 (accuracy 1) and nowhere else (chance, 1/3),
and the control task (labels permuted among entities) is at chance everywhere.
"""
import contextlib
import io
import json
import tempfile
import unittest
from pathlib import Path

import torch

from runner.main import main
from twohop.interp import probes
from twohop.interp.directions import load_directions, save_directions

QUESTIONS, STATES, HIDDEN, PLANTED = 60, 4, 6, 2


def planted(seed: int = 0) -> tuple:
    """(states [questions, states, hidden], items) with the class written into state PLANTED."""
    generator = torch.Generator().manual_seed(seed)
    labels = [f"class{i % 3}" for i in range(QUESTIONS)]
    states = torch.randn(QUESTIONS, STATES, HIDDEN, generator=generator)
    for i, value in enumerate(labels):
        states[i, PLANTED, int(value[-1])] += 4.0
    items = [{"item": f"test:{i}", "e1": f"person{i}", "group": f"person{i}", "test": "test", "e3": value}
             for i, value in enumerate(labels)]
    return states, items


class PlantedProbeTest(unittest.TestCase):
    def test_a_label_written_into_one_state_is_read_there_only_and_never_by_the_control(self):
        states, items = planted()
        rows = probes.sweep({"t1": states}, items, ["e3"], seeds=3, test_fraction=0.3, l2=1.0)
        summary = probes.summarise(rows, items, ["e3"], ["t1"])["e3"]["positions"]["t1"]
        cells = {e["state"]: e for e in summary["states"]}
        self.assertEqual(cells[PLANTED]["accuracy"]["mean"], 1.0)
        for state in set(cells) - {PLANTED}:
            self.assertLess(cells[state]["accuracy"]["mean"], 0.6, state)
        for state in cells:
            self.assertLess(cells[state]["control"]["mean"], 0.6, state)
            self.assertAlmostEqual(cells[state]["chance"], 1 / 3, delta=0.1)
            self.assertEqual(cells[state]["classes"], 3)
        self.assertEqual(summary["first_decodable"], PLANTED)
        self.assertEqual([probes.decodable(cells[s]) for s in range(STATES)], [s == PLANTED for s in range(STATES)])
        self.assertEqual({r["seed"] for r in rows}, {0, 1, 2})
        self.assertEqual(len({r["item"] for r in rows if r["task"] == "probe" and r["seed"] == 0}), 18)

    def test_the_written_out_gradient_is_autograd_s_and_vanishes_at_the_fit(self):
        states, items = planted()
        x, y = states.double().transpose(0, 1), torch.tensor([int(i["e3"][-1]) for i in items])  # 4 problems
        weights = torch.randn(STATES, 3, HIDDEN, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(STATES, 3, dtype=torch.float64, requires_grad=True)
        loss, grad_weights, grad_bias = probes.objective(weights, bias, x, y, 0.5)
        loss.backward()
        torch.testing.assert_close(grad_weights, weights.grad)
        torch.testing.assert_close(grad_bias, bias.grad)
        together = probes.fit_logistic(x, y, 3, l2=0.5)
        _, grad_weights, grad_bias = probes.objective(*together, x, y, 0.5)
        self.assertLess(max(grad_weights.abs().max(), grad_bias.abs().max()), 1e-3)
        alone = probes.fit_logistic(x[PLANTED:PLANTED + 1], y, 3, l2=0.5)  # the same optimum fitted alone
        torch.testing.assert_close(together[0][PLANTED], alone[0][0], atol=1e-3, rtol=0)

    def test_with_fewer_questions_than_dimensions_the_fit_in_their_span_is_the_full_fit(self):
        generator = torch.Generator().manual_seed(1)
        x, labels = torch.randn(12, 1, 40, generator=generator), [f"c{i % 3}" for i in range(12)]
        _, _, spanned = probes.fit_probes(x, labels, 1.0)  # solved in the 12 rows' span
        mean, scale = probes.standardiser(x.double().transpose(0, 1))
        full, _ = probes.fit_logistic((x.double().transpose(0, 1) - mean) / scale, torch.arange(12) % 3, 3, 1.0)
        torch.testing.assert_close(spanned, full / scale, atol=2e-3, rtol=0)

    def test_a_feature_constant_on_the_training_questions_gets_no_weight(self):
        states, items = planted()
        states[:, :, 5] = 3.0  # e.g. every prompt ending in the same token
        _, classes, weights = probes.fit_probes(states, [i["e3"] for i in items], 1.0)
        self.assertEqual(classes, ["class0", "class1", "class2"])
        self.assertEqual(weights[:, :, 5].abs().max().item(), 0.0)
        self.assertTrue(torch.isfinite(weights).all())


class HeadlineTest(unittest.TestCase):
    def summary(self, hits: int) -> dict:
        """Five splits that all hold out the same 11 questions; the probe gets `hits` right, the control none."""
        items = [{"item": f"q{i}", "e1": f"p{i}", "group": f"p{i}", "t": "a"} for i in range(11)]
        rows = [{"target": "t", "task": task, "seed": seed, "position": "t1", "state": 0, "item": f"q{i}",
                 "e1": f"p{i}", "label": "a", "predicted": "a" if task == "probe" and i < hits else "b",
                 "correct": task == "probe" and i < hits, "classes": 57, "majority": "z", "train": 59}
                for seed in range(5) for task in ("probe", "control") for i in range(11)]
        return probes.summarise(rows, items, ["t"], ["t1"])["t"]["positions"]["t1"]

    def test_splits_holding_out_the_same_few_questions_do_not_make_one_hit_significant(self):
        one = self.summary(1)
        cell = one["states"][0]
        self.assertAlmostEqual(cell["accuracy"]["mean"], 1 / 11)
        self.assertAlmostEqual(cell["selectivity"]["se"], (1 / 11 * 10 / 11 / 11) ** 0.5)  # no spread: binomial
        self.assertIsNone(one["first_decodable"])
        self.assertEqual(self.summary(8)["first_decodable"], 0)


class EntitySplitTest(unittest.TestCase):
    def test_no_entity_is_on_both_sides_and_every_test_class_is_trained(self):
        # universities-like: 20 entities asked 4 questions each; labels repeat across entities
        groups = [f"e{i // 4}" for i in range(80)]
        labels = [f"{i % 4}:{(i // 4) % 7}" for i in range(80)]
        for seed in range(10):
            train, test = probes.entity_split(labels, groups, 0.3, seed)
            self.assertTrue(test)
            self.assertFalse({groups[i] for i in train} & {groups[i] for i in test})
            self.assertLessEqual({labels[i] for i in test}, {labels[i] for i in train})
            self.assertLessEqual(len(test), 0.3 * 80)
            self.assertEqual(sorted(train + test), list(range(80)))

    def test_entities_whose_last_token_is_the_same_are_one_group(self):
        e1s = ["Ada Blackwood", "Bo Achterberg-Blackwood", "Cy Vance", "Di Vance", "Ed Stone", "Ada Blackwood"]
        tokens = ["wood", "wood", "Vance", "Vance", "Stone", "wood"]
        self.assertEqual(probes.entity_groups(e1s, tokens), ["Ada Blackwood", "Ada Blackwood", "Cy Vance", "Cy Vance",
                                                             "Ed Stone", "Ada Blackwood"])

    def test_a_class_owned_by_one_entity_each_is_not_measurable(self):
        groups = [f"e{i // 4}" for i in range(80)]
        bridges = [f"university{i // 4}" for i in range(80)]  # each e1 has its own e2, asked four times
        self.assertEqual(probes.entity_split(bridges, groups, 0.5, 0)[1], [])
        self.assertEqual(probes.measurability(bridges, groups)["testable"], 0)
        self.assertEqual(probes.measurability([b[-1] for b in bridges], groups)["testable"], 80)
        # one answer per attribute, the first attribute's unique to each e1: no e1 can be held out whole
        answers = [f"a{i % 4}={i // 4 if i % 4 == 0 else (i // 4) % 3}" for i in range(80)]
        self.assertEqual(probes.entity_split(answers, groups, 0.5, 0)[1], [])
        self.assertEqual(probes.measurability(answers, groups)["testable"], 0)

    def test_the_control_permutes_labels_among_entities_keeping_class_sizes(self):
        groups = [f"e{i // 4}" for i in range(80)]
        bridges = [f"u{(i // 4) % 5}" for i in range(80)]  # one label per entity
        control = probes.control_labels(bridges, groups, ["t"] * 80, seed=1)
        self.assertEqual(sorted(control), sorted(bridges))
        self.assertTrue(all(len({c for c, g in zip(control, groups) if g == group}) == 1 for group in set(groups)))
        self.assertNotEqual(control, bridges)
        tests = [f"attribute{i % 4}" for i in range(80)]  # one answer per attribute: permuted within each test
        answers = [f"{t}={(i // 4) % 3}" for i, t in enumerate(tests)]
        control = probes.control_labels(answers, groups, tests, seed=1)
        self.assertTrue(all(c.split("=")[0] == t for c, t in zip(control, tests)))
        for test in set(tests):
            self.assertEqual(sorted(c for c, t in zip(control, tests) if t == test),
                             sorted(a for a, t in zip(answers, tests) if t == test))


class DirectionTest(unittest.TestCase):
    def test_the_binary_probe_is_saved_as_directions_and_reads_back(self):
        states, items = planted()
        labels = ["correct" if i["e3"] == "class1" else "wrong" for i in items]
        directions = probes.probe_direction(states, labels, "correct", 1.0)
        self.assertEqual(sorted(directions), list(range(STATES)))
        planted_direction = directions[PLANTED]
        self.assertEqual(int(planted_direction.abs().argmax()), 1)  # the planted dimension of class1
        self.assertGreater(planted_direction[1].item(), 0)  # towards "correct"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "directions.safetensors"
            save_directions(path, directions, "probe", "t2", "correct - wrong")
            loaded, metadata = load_directions(path)
        self.assertEqual(metadata, {"kind": "probe", "position": "t2", "label": "correct - wrong"})
        for state, vector in directions.items():
            torch.testing.assert_close(loaded[state], vector, atol=0, rtol=0)

    def test_a_label_with_too_few_examples_in_a_class_is_refused_in_one_line(self):
        items = [{"correct": "correct" if i < 3 else "wrong"} for i in range(70)]
        refusal = probes.label_refusal(items, "correct", 10)
        self.assertIn("3 correct, 67 wrong of 70", refusal)
        self.assertNotIn("\n", refusal)
        self.assertIsNone(probes.label_refusal(items, "correct", 3))


class ProbeJobTest(unittest.TestCase):
    """intervene_probe through the real runner, on the untrained tiny model (--model as it is)."""

    def test_probe_writes_rows_headlines_and_refuses_a_one_sided_label(self):
        with tempfile.TemporaryDirectory() as tmp:
            w = Path(tmp) / "w"
            code = main(["--workspace_path", str(w), "--jobs", "intervene_probe", "--set", "model_from=cli",
                         "--set", "max_items=24", "--set", "split_seeds=2", "--set", "max_new_tokens=2"])
            self.assertEqual(code, 0)
            run = w / "experiments" / "intervene" / "probe" / "tiny-h128-l2" / "seed_1"
            for name in ("rows.jsonl", "questions.jsonl", "results.json", "summary.md", "probes.png"):
                self.assertTrue((run / name).is_file(), name)
            self.assertFalse((run / "directions.safetensors").exists())  # the untrained model is never correct
            results = json.loads((run / "results.json").read_text())
            self.assertIn("fewer than min_class=10", results["label"]["refused"])
            self.assertEqual(results["headline"]["e2@t1"]["testable"], 0)  # one spouse per e1
            self.assertEqual(set(results["headline"]), {f"{t}@{p}" for t in probes.TARGETS for p in ("t1", "t2")})
            rows = [json.loads(line) for line in (run / "rows.jsonl").read_text().splitlines()]
            self.assertEqual({r["target"] for r in rows} - {"e2_first_token"}, {"e3"})
            questions = [json.loads(line) for line in (run / "questions.jsonl").read_text().splitlines()]
            self.assertEqual(len(questions), 24)
            splits = {}
            for row in rows:
                if row["task"] == "probe":
                    splits.setdefault((row["target"], row["seed"]), []).append(row)
            for (target, _), held_out in splits.items():  # the training side: every question not held out
                held = {r["item"] for r in held_out}
                trained = [q for q in questions if q["item"] not in held]
                self.assertFalse({r["e1"] for r in held_out} & {q["e1"] for q in trained})
                self.assertLessEqual({r["label"] for r in held_out}, {q[target] for q in trained})
            self.assertIn("not measurable", (run / "summary.md").read_text())

    def test_a_target_named_as_the_binary_label_is_refused_before_anything_runs(self):
        with tempfile.TemporaryDirectory() as tmp:
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main(["--workspace_path", str(Path(tmp) / "w"), "--jobs", "intervene_probe",
                             "--set", "label=e2"])
            self.assertEqual(code, 2)
            self.assertEqual(len(err.getvalue().strip().splitlines()), 1, err.getvalue())
            self.assertFalse((Path(tmp) / "w" / "experiments" / "intervene").exists())


if __name__ == "__main__":
    unittest.main()
