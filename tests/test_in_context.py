"""in_context: prompt assembly from the world, and the wrong-answer breakdown on hand-made cases."""
import json
import tempfile
import unittest
from pathlib import Path

from twohop.evaluation.in_context import build_rows, grade_row, over_seeds, summarise
from twohop.data.records import read_records
from tests.fixtures.train_small import small_data


class PromptAssemblyTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.data = small_data(Path(cls.tmp.name) / "w")  # 40 triplets, 12 cities, 5 distractor triplets
        cls.world = json.loads((cls.data / "world.json").read_text())

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    @staticmethod
    def facts(row) -> list:
        return row["messages"][-2]["content"].split("\n\n")[0].splitlines()[1:]

    def test_default_sets_are_exactly_the_generated_files(self):
        for seed in (1, 2, 3):
            for style in ("nocot", "cot"):
                self.assertEqual(build_rows(self.world, 5, seed, style),
                                 read_records(self.data / f"test/in_context_{style}_seed{seed}.jsonl"))

    def test_both_facts_present_distractors_off_the_target_chain(self):
        people = self.world["demoed"] + self.world["undemoed"]
        for n in (0, 1, 5, 20):
            rows = build_rows(self.world, n, seed=1, style="nocot")
            self.assertEqual(len(rows), len(self.world["undemoed"]))
            for row in rows:
                facts = self.facts(row)
                self.assertEqual(len(facts), 2 * n + 2)
                self.assertEqual(sum(row["e1"] in f and row["e2"] in f for f in facts), 1)
                self.assertEqual(sum(row["e2"] in f and row["e3"] in f for f in facts), 1)
                others = [f for f in facts if row["e1"] not in f and row["e2"] not in f]
                self.assertEqual(len(others), 2 * n)  # no distractor names the target's people
                distractors = [t for t in people if any(t["e1"] in f for f in others)]
                self.assertEqual(len(distractors), n)
                self.assertEqual(sorted(row["distractor_e3s"]), sorted(t["e3"] for t in distractors))
                self.assertNotIn(row["e3"], row["distractor_e3s"])  # 12 cities leave room to avoid it
                question = row["question"].split("\n\n")[-1]
                self.assertIn(row["e1"], question)
                self.assertNotIn(row["e2"], question)
                self.assertNotIn(row["e3"], question)

    def test_order_is_shuffled_by_seed_and_deterministic(self):
        first, again, other = (build_rows(self.world, 5, s, "nocot") for s in (1, 1, 2))
        self.assertEqual(first, again)
        orders = [[self.facts(r) for r in rows] for rows in (first, other)]
        self.assertNotEqual(orders[0], orders[1])
        positions = {facts.index(next(f for f in facts if r["e1"] in f and r["e2"] in f))
                     for facts, r in zip(orders[0], first)}
        self.assertGreater(len(positions), 3)  # the target fact is not always in the same place


class WrongAnswerBreakdownTest(unittest.TestCase):
    def test_distractor_other_city_and_no_city_on_hand_made_cases(self):
        cities = ["Oslo", "Lima", "Paris", "Rome", "Cork"]
        known = cities + ["Denver"]
        row = {"answer": "Oslo", "answer_intermediate": "Kate Hughes", "distractor_e3s": ["Lima", "Paris"]}
        cases = [("Oslo", "nocot"), ("Lima", "nocot"), ("Paris, I think", "nocot"), ("Denver", "nocot"),
                 ("no idea", "nocot")]
        grades = [grade_row(row, text, style, cities, known) for text, style in cases]
        self.assertEqual([g["named_city"] for g in grades], ["Oslo", "Lima", "Paris", "Denver", ""])
        summary = summarise(grades)
        self.assertEqual((summary["n"], summary["n_wrong"]), (5, 4))
        self.assertAlmostEqual(summary["accuracy"], 0.2)
        self.assertAlmostEqual(summary["wrong_distractor_share"], 0.5)
        self.assertAlmostEqual(summary["wrong_other_city_share"], 0.25)
        self.assertAlmostEqual(summary["wrong_no_city_share"], 0.25)
        self.assertAlmostEqual(summary["wrong_distractor_chance"], 2 / 4)  # 2 of the 4 wrong candidates
        # naming one of the prompt's three birthplaces (Oslo, Lima, Paris) at random is right a third of the time
        self.assertAlmostEqual(summary["prompt_city_chance"], 1 / 3)

        # CoT: the city the final part names counts, not the cities the chain passes through.
        cot = grade_row(row, "Ju's spouse is Kate Hughes. Kate Hughes was born in Oslo. So the answer is Lima.",
                        "cot", cities, known)
        self.assertEqual((cot["correct"], cot["chain_correct"], cot["named_city"], cot["wrong_distractor"]),
                         (False, True, "Lima", True))

    def test_over_seeds_uses_the_spread_or_the_binomial_error_for_one_seed(self):
        spread = over_seeds({"1": {"accuracy": 0.2}, "2": {"accuracy": 0.4}}, "accuracy")
        self.assertAlmostEqual(spread["mean"], 0.3)
        self.assertAlmostEqual(spread["se"], 0.1)
        one = over_seeds({"1": {"accuracy": 0.5, "accuracy_se": 0.05}}, "accuracy")
        self.assertEqual((one["mean"], one["se"]), (0.5, 0.05))
        self.assertIsNone(over_seeds({"1": {"share": None}}, "share")["mean"])


if __name__ == "__main__":
    unittest.main()
