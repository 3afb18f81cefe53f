"""The evaluator: matching and grading on hand-made cases, then a real evaluation of a trained tiny model."""
import csv
import json
import struct
import tempfile
import unittest
from pathlib import Path

from runner import config as typed
from runner.errors import UserError
from twohop.evaluation import grading
from twohop.evaluation.evaluate import EvaluationConfig, evaluate_dataset
from twohop.evaluation.files import evaluate_files
from twohop.reports.evaluation import write_reports, write_seeds_summary, write_semi_synthetic_report
from twohop.stats import binomial_se, bootstrap_interval, pooled_gap
from tests.fixtures.train_small import train_small
from twohop.data.records import read_records


class MatchingTest(unittest.TestCase):
    def test_whole_words_after_normalisation(self):
        self.assertTrue(grading.mentions("It was Oslo.", "Oslo"))
        self.assertTrue(grading.mentions("born in SÃO PAULO!", "Sao Paulo"))
        self.assertFalse(grading.mentions("Venice", "Nice"))
        self.assertFalse(grading.mentions("1984", "198"))
        self.assertTrue(grading.mentions("the USA", "United States", aliases=["USA"]))

    def test_cot_grading_uses_the_chain_and_the_final_answer(self):
        row = {"answer": "Oslo", "answer_intermediate": "Kate Hughes-Marsjanska"}
        cities = ["Oslo", "Paris", "Lima"]
        good = "Ju's spouse is Kate Hughes-Marsjanska. Kate Hughes-Marsjanska was born in Oslo. So the answer is Paris."
        grades = grading.grade(row, good, "cot", cities)
        self.assertEqual((grades["chain_correct"], grades["correct"], grades["first_hop"], grades["valid_cot"]),
                         (True, False, True, True))
        nocot = grading.grade(row, "Kate Hughes-Marsjanska, so Oslo", "nocot")
        self.assertEqual((nocot["correct"], nocot["strict"], nocot["first_hop"]), (True, False, True))

    def test_an_answer_inside_the_bridge_name_is_not_an_answer(self):
        # The state of a favourite university that is the University of Texas at Austin.
        row = {"answer": "Texas", "answer_intermediate": "University of Texas at Austin", "e1": "Ju Hughes-Marsjanska"}
        cases = {"University of Texas": (False, "answer_inside_name"), "Texas": (True, "answer_stated"),
                 "It is in Texas.": (True, "answer_stated"), "the state of Texas": (True, "answer_stated"),
                 "University of Texas at Austin": (False, "answer_inside_name"),
                 "Rice University": (False, "no_answer")}
        for generation, (correct, rule) in cases.items():
            grades = grading.grade(row, generation, "nocot")
            self.assertEqual((grades["correct"], grades["rule"]), (correct, rule), generation)
        named = grading.grade({**row, "answer_intermediate": "Rice University"}, "Rice University", "nocot")
        self.assertEqual((named["correct"], named["first_hop"], named["rule"]), (False, True, "bridge_only"))
        cot = "Ju's favorite university is the University of Texas at Austin. It is in Texas. So the answer is Texas."
        grades = grading.grade(row, cot, "cot", ["Texas", "Ohio"])
        self.assertEqual((grades["correct"], grades["chain_correct"], grades["valid_cot"]), (True, True, True))
        only_bridge = "Ju's favorite university is the University of Texas at Austin. So the answer is University of Texas."
        grades = grading.grade(row, only_bridge, "cot", ["Texas", "Ohio"])
        self.assertEqual((grades["correct"], grades["chain_correct"], grades["rule"]), (False, False, "answer_inside_name"))
        # lm-eval's hook gets numbers only (the rule is a string).
        self.assertEqual(grading.process_results({**row, "style": "nocot"}, [" Texas"]),
                         {"correct": 1.0, "strict": 1.0, "first_hop": 0.0})

    def test_an_answer_inside_another_entity_of_the_bridges_type_is_not_an_answer(self):
        # Harvard's state, answered with another university whose name holds it.
        row = {"answer": "Massachusetts", "answer_intermediate": "Harvard University", "e1": "Ju Hughes-Marsjanska"}
        mit = "Massachusetts Institute of Technology"
        self.assertEqual(grading.grade(row, mit, "nocot")["rule"], "answer_stated")  # the row lists no candidates
        typed_row = {**row, "bridge_candidates": ["Harvard University", mit, "Yale University"]}
        cases = {mit: (False, "answer_inside_other_entity"), "Massachusetts": (True, "answer_stated"),
                 f"{mit}, in Massachusetts": (True, "answer_stated"), "Yale University": (False, "no_answer")}
        for generation, (correct, rule) in cases.items():
            grades = grading.grade(typed_row, generation, "nocot")
            self.assertEqual((grades["correct"], grades["rule"]), (correct, rule), generation)
        cot = f"Ju's favorite university is {mit}. So the answer is {mit}."
        grades = grading.grade(typed_row, cot, "cot", ["Massachusetts", "Connecticut"])
        self.assertEqual((grades["correct"], grades["chain_correct"], grades["rule"]),
                         (False, False, "answer_inside_other_entity"))
        # The lm-eval export carries the list, so its hook grades the same.
        from twohop.evaluation.lm_eval_tasks import exported_doc
        doc = exported_doc(typed_row, "prompt", "nocot", [])
        self.assertEqual(grading.process_results(doc, [f" {mit}"])["correct"], 0.0)
        self.assertEqual(grading.process_results(doc, [" Massachusetts"])["correct"], 1.0)
        # Hop B asks about its e2 directly: naming it is no wrong first hop.
        hop_b = {"answer": "Chicago", "e2": "University of Chicago", "bridge_candidates": ["University of Chicago", mit]}
        self.assertEqual(grading.grade(hop_b, "University of Chicago", "nocot")["rule"], "answer_stated")
        # A bridge inside another candidate's name is not named: "Xbox 360" names no Xbox.
        xbox = {"answer": "Microsoft", "answer_intermediate": "Xbox", "bridge_candidates": ["Xbox", "Xbox 360"]}
        for reply, named in (("Xbox 360", False), ("Xbox", True), ("the Xbox, not the Xbox 360", True)):
            grades = grading.grade(xbox, reply, "nocot")
            self.assertEqual((grades["first_hop"], grades["rule"]), (named, "bridge_only" if named else "no_answer"))

    def test_the_chain_states_a_candidate_not_one_inside_another(self):
        # Stanford's school color is Cardinal Red; "Red" is a candidate too and ends it.
        row = {"answer": "Cardinal Red", "answer_intermediate": "Stanford University", "e1": "Ju Hughes-Marsjanska"}
        cot = ("Ju's favorite university is Stanford University. The school color of Stanford University is "
               "Cardinal Red. So the answer is Cardinal Red.")
        grades = grading.grade(row, cot, "cot", ["Red", "Cardinal Red", "Yale Blue"])
        self.assertEqual((grades["correct"], grades["chain_correct"]), (True, True))
        self.assertEqual(grading.chain_answer("It is Red, not Cardinal Red.", ["Red", "Cardinal Red"]), "Cardinal Red")
        self.assertEqual(grading.chain_answer("It is Cardinal Red, not Red.", ["Red", "Cardinal Red"]), "Red")

    def test_bootstrap_interval_brackets_the_mean(self):
        low, high = bootstrap_interval([1.0] * 50 + [0.0] * 50, 2000)
        self.assertLess(low, 0.5)
        self.assertGreater(high, 0.5)
        self.assertLess(high - low, 0.3)
        self.assertEqual(bootstrap_interval([2.0] * 10, 100), (2.0, 2.0))


class PooledGapTest(unittest.TestCase):
    def test_questions_weigh_the_mean_and_the_tests_intervals_combine(self):
        def test(gap, se, n):
            return {"gap": gap, "ci95": [gap - 1.96 * se, gap + 1.96 * se], "n": n}
        pooled = pooled_gap([test(1.0, 0.5, 10), test(-1.0, 0.2, 30)])
        self.assertAlmostEqual(pooled["gap"], -0.5)  # (10 * 1 - 30 * 1) / 40
        se = (5.0 ** 2 + 6.0 ** 2) ** 0.5 / 40  # 10 * 0.5 and 30 * 0.2, over 40 questions
        self.assertAlmostEqual(pooled["ci95"][1] - pooled["gap"], 1.96 * se)
        self.assertEqual((pooled["n"], pooled["tests"]), (40, 2))

    def test_the_semi_synthetic_finding_holds_only_when_the_interval_is_above_zero(self):
        from twohop.reports.study import semi_synthetic_gap_finding
        above = {"loss_gap": {"gap": 0.9, "ci95": [0.1, 1.7], "n": 67, "tests": 4}}
        across = {"loss_gap": {"gap": 0.5, "ci95": [-0.1, 1.1], "n": 67, "tests": 4}}
        self.assertEqual([semi_synthetic_gap_finding(p)[2] for p in (above, across, {"loss_gap": None})],
                         [True, False, None])
        self.assertIn("+0.90 nats [+0.10, +1.70] over 67 questions of 4 tests", semi_synthetic_gap_finding(above)[1])


class SeedSummaryTest(unittest.TestCase):
    def test_mean_and_standard_error_over_the_given_seeds(self):
        with tempfile.TemporaryDirectory() as tmp:
            headlines = {1: {"acc_2hop_cot": 0.2, "acc_a": 1.0}, 2: {"acc_2hop_cot": 0.4}}
            metrics = write_seeds_summary(headlines, Path(tmp), "t")
            self.assertAlmostEqual(metrics["acc_2hop_cot/mean"], 0.3)
            summary = json.loads((Path(tmp) / "seeds_summary.json").read_text())
            self.assertEqual(summary["seeds"], [1, 2])
            self.assertAlmostEqual(summary["metrics"]["acc_2hop_cot"]["se"], 0.1)  # sample s.d. 0.1414 / sqrt(2)
            self.assertEqual(summary["metrics"]["acc_a"]["n"], 1)
            self.assertIsNone(summary["metrics"]["acc_a"]["se"])  # one seed says nothing about the spread
            self.assertIn("| acc_2hop_cot | 0.3000 | 0.1000 | 2 |", (Path(tmp) / "seeds_summary.md").read_text())


class SemiSyntheticReportTest(unittest.TestCase):
    def test_rows_sorted_by_nocot_and_tables_match_the_results(self):
        def results(nocot, cot):
            def test(p, kind, style="nocot", attribute="city"):
                return {"n": 20, "correct": p, "correct_se": binomial_se(p, 20), "chance": 0.05, "kind": kind,
                        "style": style, "attribute": attribute}
            return {"tests": {"test/city_nocot": test(nocot, "two_hop"),
                              "test/city_cot": {**test(cot, "two_hop", "cot"), "chain_correct": cot, "chain_correct_se": 0.1},
                              "test/b_city": test(0.9, "hop_b"), "test/first_hop": test(1.0, "hop_a", attribute="")},
                    "loss_gaps": {}}
        with tempfile.TemporaryDirectory() as tmp:
            summary = write_semi_synthetic_report({"parks": results(0.1, 0.8), "ships": results(0.35, 0.6)}, Path(tmp), "t")
            self.assertEqual((summary["types"], summary["attributes"]), (2, 2))
            self.assertAlmostEqual(summary["mean_nocot"], 0.225)
            with open(Path(tmp) / "summary.csv") as f:
                table = list(csv.DictReader(f))
            self.assertEqual([r["entity_type"] for r in table], ["ships", "parks"])
            self.assertEqual([float(r["nocot"]) for r in table], [0.35, 0.1])
            png = (Path(tmp) / "accuracy_by_type.png").read_bytes()
            self.assertEqual(png[:8], b"\x89PNG\r\n\x1a\n")
            self.assertGreaterEqual(struct.unpack(">II", png[16:24]), (400, 300))


class ShortcutTest(unittest.TestCase):
    """A semi-synthetic table the test writes: one entity whose name holds its answer, one that does not."""

    def test_flagged_in_the_data_and_left_out_of_the_headline(self):
        import logging
        from types import SimpleNamespace
        from unittest import mock
        from models import ensure_model, resolve_model
        from twohop.data import semi_synthetic, tables
        spec = {"noun": "university", "attributes": {"state": {"question": "In which state is {subject}?",
                                                               "statement": "{subject} is in {value}."}}}
        entities = [{"name": "University of Texas at Austin", "state": "Texas"},
                    {"name": "Rice University", "state": "Ohio"}, {"name": "Yale University", "state": "Connecticut"}]
        with tempfile.TemporaryDirectory() as tmp, \
                mock.patch.object(tables, "entity_table", return_value=(spec, entities)):
            ctx = SimpleNamespace(config=typed.defaults(semi_synthetic.SemiSyntheticConfig), run_dir=Path(tmp))
            semi_synthetic.generate(ctx, "unis")
            data = Path(tmp) / "data"
            card = json.loads((data / "card.json").read_text())
            self.assertEqual(card["shortcuts"]["test/state_nocot"], 1)
            self.assertEqual(card["shortcuts"]["test/b_state"], 1)
            flagged = [r for r in read_records(data / "test/state_nocot.jsonl") if r["shortcut"]]
            self.assertEqual([r["e2"] for r in flagged], ["University of Texas at Austin"])
            self.assertIn("'Texas' is in e2's name", flagged[0]["shortcut"])

            model = resolve_model("tiny", Path(tmp) / "transformers")
            ensure_model(model)
            config = {**typed.defaults(EvaluationConfig), "bootstrap": 20, "cot_max_new_tokens": 8}
            report = evaluate_dataset(model.path, data, config, logging.getLogger("test"), Path(tmp))
            nocot = report["tests"]["test/state_nocot"]
            self.assertEqual((nocot["n"], nocot["shortcut"]["n"]), (2, 1))
            self.assertEqual(sum(nocot["rules"].values()), 2)
            self.assertEqual(report["loss_gaps"]["test/state_nocot"]["n"], 2)


class EvaluateTrainedModelTest(unittest.TestCase):
    def test_results_tables_and_plot_agree(self):
        with tempfile.TemporaryDirectory() as tmp:
            w = Path(tmp) / "w"
            run = Path(tmp) / "train"
            train_small(w, run, max_steps=4)
            data = w / "experiments/generate_data/spouses/data"
            out = Path(tmp) / "eval"
            out.mkdir()
            config = {**typed.defaults(EvaluationConfig), "max_rows": 20, "memorisation_rows": 10, "bootstrap": 200, "cot_max_new_tokens": 32}
            import logging
            report = evaluate_dataset(run / "model", data, config, logging.getLogger("test"), out)
            write_reports(report, out, "test", run / "metrics.jsonl")
            results = json.loads((out / "results.json").read_text())
            self.assertEqual(results["tests"]["test/2hop_nocot"]["n"], 14)
            self.assertAlmostEqual(results["tests"]["test/2hop_nocot"]["chance"], 1 / 12)
            self.assertIn("candidate_accuracy", results["tests"]["test/2hop_nocot"])
            gap = results["loss_gaps"]["test/2hop_nocot"]
            self.assertAlmostEqual(gap["gap"], gap["loss_shuffled"] - gap["loss_true"], delta=0.2)
            self.assertLessEqual(gap["ci95"][0], gap["gap"])
            self.assertGreaterEqual(gap["ci95"][1], gap["gap"])
            for key in ("acc_a", "acc_b", "acc_2hop_nocot", "acc_2hop_cot", "acc_2hop_cot_chain", "loss_gap", "acc_a_train"):
                self.assertIn(key, results["headline"])
            predictions = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
            self.assertEqual(sum(p["test"] == "test/2hop_cot" for p in predictions), 14)
            with open(out / "summary.csv") as f:
                table = {row["test"]: row for row in csv.DictReader(f)}
            for test, summary in results["tests"].items():
                self.assertAlmostEqual(float(table[test]["correct"]), summary["correct"], places=4)
                self.assertIn(f"| {test} |", (out / "summary.md").read_text())
            for plot in ("accuracy.png", "loss_over_training.png"):
                png = (out / plot).read_bytes()
                self.assertEqual(png[:8], b"\x89PNG\r\n\x1a\n", plot)
                width, height = struct.unpack(">II", png[16:24])
                self.assertGreaterEqual((width, height), (400, 300), plot)

            config["nocot_max_new_tokens"] = 2000
            with self.assertRaisesRegex(UserError, r"over the model's max length 1024"):
                evaluate_dataset(run / "model", data, config, logging.getLogger("test"), out)

            config["nocot_max_new_tokens"] = typed.defaults(EvaluationConfig)["nocot_max_new_tokens"]
            (data / "test/2hop_nocot.jsonl").write_text("")
            with self.assertRaisesRegex(UserError, r"dataset file .*2hop_nocot.jsonl is empty"):
                evaluate_dataset(run / "model", data, config, logging.getLogger("test"), out)



class LmEvalInteropTest(unittest.TestCase):
    """Our evaluator and lm-eval (in process and its own CLI) agree on the same model and data."""

    def test_both_back_ends_and_the_cli_agree(self):
        import logging
        with tempfile.TemporaryDirectory() as tmp:
            w, run = Path(tmp) / "w", Path(tmp) / "train"
            train_small(w, run, max_steps=30, lr=5e-3)
            data = w / "experiments/generate_data/spouses/data"
            config = {**typed.defaults(EvaluationConfig), "max_rows": 12, "memorisation_rows": 6, "bootstrap": 50, "cot_max_new_tokens": 32}
            reports = {}
            for backend in ("ours", "lm_eval"):
                out = Path(tmp) / backend
                out.mkdir()
                reports[backend] = evaluate_dataset(run / "model", data, {**config, "backend": backend},
                                                    logging.getLogger("test"), out)
                reports[backend]["predictions"] = (out / "predictions.jsonl").read_text()
            self.assertEqual(reports["ours"]["predictions"], reports["lm_eval"]["predictions"])
            for test, summary in reports["lm_eval"]["tests"].items():
                self.assertAlmostEqual(summary["lm_eval"]["correct"], summary["correct"], places=6, msg=test)
                self.assertEqual(summary["correct"], reports["ours"]["tests"][test]["correct"])

            # The exported folder works by itself: lm_eval's CLI, no project code on the path.
            summary = reports["ours"]["tests"]["test/2hop_nocot"]
            self.assertAlmostEqual(self.cli_accuracy(run / "model", Path(tmp) / "ours", summary["lm_eval_task"]),
                                   summary["correct"], places=6)

            # A reference-layout file (only the reference's fields: no rendered prompt, a list of aliases as the
            # answer, no bridge), brought with evaluate_files: both back ends and the CLI agree on it too.
            reference = Path(tmp) / "reference" / "spouse.jsonl"
            reference.parent.mkdir()
            rows = read_records(data / "train/a_demoed.jsonl")[:12]  # trained: some are answered right
            reference.write_text("".join(json.dumps(
                {"messages": r["messages"], "question": r["question"], "answer": [r["answer"], r["answer"].upper()],
                 "answer_intermediate": "", "auxiliary_loss_prefix": ""}) + "\n" for r in rows))
            brought = {}
            for backend in ("ours", "lm_eval"):
                out = Path(tmp) / f"files_{backend}"
                out.mkdir()
                brought[backend] = evaluate_files(run / "model", [reference.parent], {**config, "backend": backend},
                                                  logging.getLogger("test"), out)["tests"]["spouse"]
            self.assertEqual(brought["ours"]["correct"], brought["lm_eval"]["correct"])
            self.assertAlmostEqual(brought["lm_eval"]["lm_eval"]["correct"], brought["ours"]["correct"], places=6)
            self.assertIsNone(brought["ours"]["first_hop"])
            self.assertAlmostEqual(self.cli_accuracy(run / "model", Path(tmp) / "files_ours", brought["ours"]["lm_eval_task"]),
                                   brought["ours"]["correct"], places=6)

    @staticmethod
    def cli_accuracy(model: Path, run_dir: Path, task: str) -> float:
        """`correct` of one exported task run by lm_eval's own CLI, with a bare environment."""
        import subprocess
        import sys
        out = run_dir / "cli"
        result = subprocess.run(
            [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model}", "--device", "cpu",
             "--include_path", str(run_dir / "lm_eval_tasks"), "--tasks", task, "--output_path", str(out)],
            cwd=run_dir, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HOME": str(run_dir)})
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(next(out.rglob("results_*.json")).read_text())["results"][task]["correct,none"]


class TwoRankEvaluationTest(unittest.TestCase):
    def test_two_ranks_split_the_work_and_match_one_process(self):
        import os
        import subprocess
        import sys
        fixture = Path(__file__).parent / "fixtures" / "evaluate_ranks.py"
        with tempfile.TemporaryDirectory() as tmp:
            w, run = Path(tmp) / "w", Path(tmp) / "train"
            train_small(w, run, max_steps=30, lr=5e-3)
            data = w / "experiments/generate_data/spouses/data"
            outputs = {}
            for ranks in (1, 2):
                out = Path(tmp) / f"ranks_{ranks}"
                # The one launch form that really starts 2 ranks on CPU (gloo); see shared notes.
                launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
                command = (launch if ranks == 2 else [sys.executable]) + [str(fixture), str(run / "model"), str(data), str(out)]
                env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
                result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
                self.assertEqual(result.returncode, 0, result.stderr[-3000:])
                outputs[ranks] = (json.loads((out / "results.json").read_text()), (out / "predictions.jsonl").read_text())
            self.assertEqual((outputs[1][0]["ranks"], outputs[2][0]["ranks"]), (1, 2))
            self.assertEqual(outputs[1][1], outputs[2][1], "predictions differ between 1 and 2 ranks")
            self.assertEqual(outputs[1][0]["tests"], outputs[2][0]["tests"])


if __name__ == "__main__":
    unittest.main()


class CandidateScoringTest(unittest.TestCase):
    def test_packed_scores_equal_scoring_each_prompt_and_reply_alone(self):
        import torch
        import torch.nn.functional as F
        from models import ensure_model, load_model, resolve_model
        from twohop.evaluation import generation
        with tempfile.TemporaryDirectory() as tmp:
            ref = resolve_model("tiny", Path(tmp))
            ensure_model(ref)
            model, tokenizer = load_model(ref.path)
        torch.manual_seed(0)
        for parameter in model.parameters():  # a random model, so the scores differ between candidates
            parameter.data.normal_(0, 0.2)
        prompts = [generation.prompt_text(tokenizer, [{"role": "user", "content": q}])
                   for q in ("Where was Ju born?", "Who is the spouse of Kate Hughes-Marsjanska, born in Oslo?")]
        candidates = ["Oslo", "Sao Paulo", "Kate Hughes-Marsjanska", "Lima", "1984"]
        replies = generation.reply_ids(tokenizer, candidates)
        expected = torch.zeros(len(prompts), len(candidates))
        for p, prompt in enumerate(prompts):
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            for c, reply in enumerate(replies):
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([prompt_ids + reply])).logits[0].float()
                logprobs = F.log_softmax(logits[len(prompt_ids) - 1:-1], -1)
                expected[p, c] = logprobs[torch.arange(len(reply)), torch.tensor(reply)].sum()
        self.assertGreater(len({len(r) for r in replies}), 1)  # replies of different lengths
        for pack_tokens in (512, 30):  # everything in one pack per prompt; several packs per prompt
            scores = generation.score_candidates(model, tokenizer, prompts, candidates, pack_tokens=pack_tokens,
                                                 batch_size=3)
            torch.testing.assert_close(scores, expected, atol=2e-4, rtol=0)
