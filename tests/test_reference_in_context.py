"""The reference repo's in-context files (triplet/context/question/answer rows): the layout read and refused,
distractors' e3 read from the contexts, a planted grading check, and the in_context job end to end on them."""
import contextlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

from runner.errors import UserError
from twohop.data import tables
from twohop.data.records import record
from twohop.data.reference_in_context import (as_records, distractor_e3s, is_reference_in_context,
                                              read_reference_in_context)
from twohop.evaluation.in_context import grade_row, reference_answers, summarise

ROOT = Path(__file__).resolve().parents[1]
# (e1, e2, e3) per question, then its distractor triplets, in the reference's phrasing and one fact per line
CHAINS = [(("Ju Hughes", "Kate Orr", "Lima"), [("Bo Vance", "Ada Pym", "Oslo"), ("Cy Dunn", "Eve Roe", "Quito")]),
          (("Al Bright", "Mo Tate", "Oslo"), [("Di Lowe", "Flo Kerr", "Lima"), ("Gus Hale", "Ina Penn", "Perth")]),
          (("Ned Cole", "Ola Shaw", "Quito"), [("Pia Wynn", "Rex Moss", "Perth"), ("Sam Tull", "Tia Vale", "Oslo")]),
          (("Uma Reed", "Val Ince", "Perth"), [("Wes Yale", "Xia Zorn", "Quito"), ("Yul Abbot", "Zoe Birch", "Lima")])]


def reference_row(target: tuple, distractors: list) -> dict:
    facts = [line for e1, e2, e3 in [target, *distractors]
             for line in (f"{e1}'s spouse is {e2}.", f"{e2} was born in the city of {e3}.")]
    facts = facts[1::2] + facts[::2]  # the second hops first: the target's facts apart, as after a shuffle
    return {"triplet": list(target), "context": "\n".join(facts),
            "question": f"In which city was {target[0]}'s spouse born?", "answer": target[2]}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class LayoutTest(unittest.TestCase):
    rows = [reference_row(target, distractors) for target, distractors in CHAINS]

    def test_layout_recognised_and_prompt_is_the_references(self):
        self.assertTrue(all(is_reference_in_context(r) for r in self.rows))
        self.assertFalse(is_reference_in_context(record("Q?", "A", "A")))
        prompts = tables.templates("reference_in_context")
        for style in ("nocot", "cot"):
            system, user, _ = as_records(self.rows[:1], style)[0]["messages"]
            self.assertEqual(system["content"], prompts[style])
            self.assertTrue(system["content"].startswith('You will be given questions about fictional characters'))
            self.assertEqual(user["content"], f"{self.rows[0]['context']}\n\n{self.rows[0]['question']}")

    def test_distractors_e3_read_from_the_context(self):
        for row, (_, distractors) in zip(self.rows, CHAINS):
            self.assertEqual(distractor_e3s(row), [e3 for _, _, e3 in distractors])
        # any phrasing, as long as the target's own second hop is one line of it
        row = {"triplet": ["A Ku", "B Lo", "Oslo"], "context": "A Ku wed B Lo.\nOslo is where B Lo was born.\n"
               "C Mo wed D No.\nLima is where D No was born.\nLima Perth is where E Po was born.",
               "question": "Where was A Ku's spouse born?", "answer": "Oslo"}
        self.assertEqual(distractor_e3s(row), ["Lima", "Lima Perth"])
        self.assertEqual(as_records([row], "nocot")[0]["n_distractors"], 2)

    def test_planted_generations_fall_into_the_breakdown(self):
        records = as_records(self.rows, "nocot")
        answers = reference_answers(records)
        self.assertEqual(answers[0], ["Lima", "Oslo", "Perth", "Quito"])
        other_city = next(c for c in tables.cities() if c not in answers[0])
        cases = [(records[0], "Lima"), (records[0], "Oslo, I think"), (records[1], other_city),
                 (records[2], "no idea"), (records[3], "Quito")]
        grades = [grade_row(r, text, "nocot", *answers) for r, text in cases]
        self.assertEqual([(g["correct"], g["wrong_distractor"], g["wrong_other_city"], g["wrong_no_city"]) for g in grades],
                         [(True, False, False, False), (False, True, False, False), (False, False, True, False),
                          (False, False, False, True), (False, True, False, False)])
        summary = summarise(grades)
        self.assertEqual((summary["n_wrong"], summary["accuracy"]), (4, 0.2))
        self.assertAlmostEqual(summary["wrong_distractor_share"] + summary["wrong_other_city_share"]
                               + summary["wrong_no_city_share"], 1.0)
        self.assertAlmostEqual(summary["wrong_distractor_share"], 0.5)

    def test_malformed_rows_refused_by_file_line_and_field(self):
        good = self.rows[0]
        bad = {"missing field 'triplet'": {k: v for k, v in good.items() if k != "triplet"},
               "field 'triplet' must be [e1, e2, e3]": {**good, "triplet": good["triplet"][:2]},
               "field 'context' has no line stating the second hop": {**good, "context": good["context"].replace(
                   "Kate Orr was born", "Someone was born")},
               "field 'question' must be text": {**good, "question": ["In which city?"]}}
        with tempfile.TemporaryDirectory() as tmp:
            for expect, row in bad.items():
                path = write_jsonl(Path(tmp) / "ref.jsonl", [good, row])
                with self.assertRaises(UserError) as caught:
                    read_reference_in_context(path)
                self.assertIn(f"ref.jsonl:2: {expect}", str(caught.exception))
                self.assertNotIn("\n", str(caught.exception))


class InContextJobTest(unittest.TestCase):
    """The in_context job on reference files, a tiny (untrained) model standing in for a real one."""

    def test_malformed_file_stops_the_invocation_before_anything_runs(self):
        with tempfile.TemporaryDirectory() as tmp:
            rows = [reference_row(*c) for c in CHAINS]
            path = write_jsonl(Path(tmp) / "all_in_context_test_1.jsonl", rows[:2] + [{**rows[2], "triplet": "x"}])
            workspace = Path(tmp) / "W"
            result = subprocess.run([sys.executable, "runner/main.py", "--workspace_path", str(workspace), "--jobs",
                                     "in_context_nocot", "--set", f"reference_files=[{path}]"],
                                    cwd=ROOT, capture_output=True, text=True, timeout=300)
            self.assertEqual(result.returncode, 2, result.stderr)
            self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
            self.assertIn("all_in_context_test_1.jsonl:3: field 'triplet'", result.stderr)
            self.assertFalse(workspace.exists())

    def test_keys_the_files_override_are_refused_not_dropped(self):
        from runner.main import main
        with tempfile.TemporaryDirectory() as tmp:
            path = write_jsonl(Path(tmp) / "all_in_context_test_1.jsonl", [reference_row(*c) for c in CHAINS])
            for key in ("data_seeds=[1]", "distractor_counts=[3]"):
                err = io.StringIO()
                with contextlib.redirect_stderr(err):
                    code = main(["--workspace_path", str(Path(tmp) / "W"), "--jobs", "in_context_nocot", "--set",
                                 f"reference_files=[{path}]", "--set", key, "--dry_run"])
                self.assertEqual(code, 2)
                self.assertIn("does not apply with reference_files", err.getvalue())

    def test_reference_files_evaluated_end_to_end(self):
        from models import ensure_model, resolve_model
        from runner.main import main
        with tempfile.TemporaryDirectory() as tmp:
            workspace, rows = Path(tmp) / "W", [reference_row(*c) for c in CHAINS]
            tiny = resolve_model("tiny", workspace / "transformers")
            ensure_model(tiny)
            shutil.copytree(tiny.path, workspace / "transformers" / "plain")  # not the preset: no pretraining
            files = [write_jsonl(Path(tmp) / f"all_in_context_test_{i}.jsonl", rows[i - 1:i + 2]) for i in (1, 2)]
            args = ["--workspace_path", str(workspace), "--jobs", "in_context_nocot", "--model", "plain",
                    "--set", "styles=[nocot,cot]", "--set", "cot_max_new_tokens=32",
                    "--set", f"reference_files=[{files[0]}, {files[1]}]"]
            self.assertEqual(main(args), 0)
            run = workspace / "experiments/in_context/nocot/plain"
            for output in ("results.json", "predictions.jsonl", "summary.md", "accuracy_vs_distractors.png"):
                self.assertTrue((run / output).is_file(), output)
            self.check_results(json.loads((run / "results.json").read_text()),
                               [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()],
                               [str(f) for f in files])

            first = json.loads((run / "status.json").read_text())["run_id"]
            self.assertEqual(main(args), 0)  # same files: skipped
            self.assertEqual(json.loads((run / "status.json").read_text())["run_id"], first)
            write_jsonl(files[1], rows)  # an edited file: evaluated again
            self.assertEqual(main(args), 0)
            self.assertNotEqual(json.loads((run / "status.json").read_text())["run_id"], first)
            self.assertEqual(len((run / "predictions.jsonl").read_text().splitlines()), 2 * (3 + 4))

    def test_evaluate_twohop_files_recognises_the_layout(self):
        from models import ensure_model, resolve_model
        from runner.main import main
        with tempfile.TemporaryDirectory() as tmp:
            workspace, rows = Path(tmp) / "W", [reference_row(*c) for c in CHAINS]
            tiny = resolve_model("tiny", workspace / "transformers")
            ensure_model(tiny)
            shutil.copytree(tiny.path, workspace / "transformers" / "plain")
            given = Path(tmp) / "given"
            given.mkdir()
            files = [write_jsonl(given / f"all_in_context_test_{i}.jsonl", rows[i - 1:i + 2]) for i in (1, 2)]
            self.assertEqual(main(["--workspace_path", str(workspace), "--jobs", "evaluate_twohop_files", "--model",
                                   "plain", "--set", "cot_max_new_tokens=32", "--set", f"test_files=[{given}]"]), 0)
            run = workspace / "experiments/evaluate_twohop/files/plain/seed_1"
            self.check_results(json.loads((run / "in_context/results.json").read_text()),
                               [json.loads(line) for line in (run / "in_context/predictions.jsonl").read_text().splitlines()],
                               [str(f.resolve()) for f in files])
            headline = json.loads((run / "results.json").read_text())["headline"]
            self.assertEqual(sorted(headline), ["in_context_accuracy_cot_2", "in_context_accuracy_nocot_2"])

    def check_results(self, results: dict, predictions: list, files: list):
        self.assertEqual(results["files"], files)
        self.assertEqual(results["candidates"], 4)
        self.assertEqual(sorted(results["settings"]), ["cot/2", "nocot/2"])
        self.assertEqual(len(predictions), 2 * 2 * 3)
        for setting in results["settings"].values():
            self.assertEqual(list(setting["per_seed"]), files)
            for file, summary in setting["per_seed"].items():
                graded = [p for p in predictions if p["file"] == file and p["style"] == setting["style"]]
                self.assertEqual(summary["n"], len(graded))
                self.assertAlmostEqual(summary["accuracy"], sum(p["correct"] for p in graded) / len(graded))
                wrong = [p for p in graded if not p["correct"]]
                self.assertEqual(summary["n_wrong"], len(wrong))
                self.assertEqual(sum(p["wrong_distractor"] + p["wrong_other_city"] + p["wrong_no_city"] for p in wrong),
                                 len(wrong))  # each wrong answer in exactly one part of the breakdown
                self.assertEqual([p["distractor_e3s"] for p in graded],
                                 [[e3 for _, _, e3 in d] for _, d in CHAINS[int(file[-7]) - 1:int(file[-7]) + 2]])


if __name__ == "__main__":
    unittest.main()
