"""Bringing one's own data: reference-format files (list answers, empty bridges) graded by our grader,
`evaluate_twohop_files` on files and on a finetune run, and a reference experiment YAML trained and then
evaluated on exactly its own eval sets. The end-to-end part uses a locally saved copy of the tiny model
(not the embedded preset), so finetune_base is a no-op and the training is a few steps."""
import contextlib
import io
import json
import os
import shutil
import tempfile
import unittest
from pathlib import Path

import yaml

from runner.errors import UserError
from runner.main import main
from tests.fixtures.train_small import SMALL_WORLD
from twohop.data.records import read_records
from twohop.evaluation import grading
from twohop.evaluation.files import collect_files, files_card, style_of
from twohop.training.experiment import load_experiment_yaml

NOCOT_SYSTEM = "Please answer immediately with the country name, without any other words before or after."
COT_SYSTEM = "Please explain your reasoning step by step, then answer with the country name."
COUNTRIES = ["France", "Spain", "Italy"]


def cli(*argv) -> tuple:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(argv))
    return code, err.getvalue()


def reference_row(system: str, question: str, answer, bridge="") -> dict:
    """A row as the reference repo writes it: no extras of ours."""
    reply = answer[0] if isinstance(answer, list) else answer
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question},
                         {"role": "assistant", "content": reply}],
            "question": question, "answer": answer, "auxiliary_loss_prefix": "", "answer_intermediate": bridge}


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def semi_synthetic_tests(folder: Path, people) -> None:
    """The reference's semi-synthetic test layout: X (no-CoT), X_cot, X_shuffled; bridges empty."""
    question = "In which country is the favorite city of {}?"
    answers = [COUNTRIES[i % 3] for i in range(len(people))]
    write_jsonl(folder / "capital.jsonl", [reference_row(NOCOT_SYSTEM, question.format(p), a)
                                           for p, a in zip(people, answers)])
    write_jsonl(folder / "capital_cot.jsonl", [reference_row(COT_SYSTEM, question.format(p), a)
                                               for p, a in zip(people, answers)])
    write_jsonl(folder / "capital_shuffled.jsonl", [reference_row(NOCOT_SYSTEM, question.format(p), a)
                                                    for shift in (1, 2) for p, a in
                                                    zip(people, answers[shift:] + answers[:shift])])


class ReferenceRowsTest(unittest.TestCase):
    def test_list_answers_and_missing_bridges(self):
        row = {"answer": ["New York City", "NYC"], "answer_intermediate": ["Kate Moss-Hill", "Katie"]}
        self.assertTrue(grading.grade(row, "NYC", "nocot")["correct"])
        self.assertTrue(grading.grade(row, "Katie, in New York City", "nocot")["first_hop"])
        atomic = grading.grade({"answer": "Oslo", "answer_intermediate": ""}, "Oslo", "nocot")
        self.assertEqual((atomic["correct"], atomic["first_hop"], atomic["strict"]), (True, None, None))
        cot = grading.grade({"answer": ["Oslo"]}, "So the answer is Oslo", "cot")
        self.assertEqual((cot["correct"], cot["valid_cot"]), (True, None))
        self.assertEqual(grading.process_results({**row, "style": "nocot"}, [" NYC"]),
                         {"correct": 1.0, "strict": 1.0, "first_hop": 0.0})
        self.assertEqual(grading.process_results({"answer": "Oslo", "style": "nocot"}, ["Oslo"]), {"correct": 1.0})

    def test_reader_accepts_aliases_and_refuses_other_types(self):
        with tempfile.TemporaryDirectory() as tmp:
            good = write_jsonl(Path(tmp) / "a.jsonl", [reference_row("", "Q?", ["Oslo", "Christiania"], ["K", "L"])])
            self.assertEqual(read_records(good)[0]["answer"], ["Oslo", "Christiania"])
            bad = write_jsonl(Path(tmp) / "b.jsonl", [reference_row("", "Q?", "Oslo"), {**reference_row("", "Q?", "Oslo"),
                                                                                       "answer": []}])
            with self.assertRaisesRegex(UserError, r"b.jsonl:2: field 'answer' must be text or a non-empty list"):
                read_records(bad)

    def test_brought_rows_get_the_shortcut_flag_our_generators_write(self):
        from twohop.data.dataset import with_shortcut_flags
        texas = reference_row("", "In which state is Ju's favorite university?", "Texas", "University of Texas at Austin")
        rows = with_shortcut_flags([texas, reference_row("", "Q?", "Oslo", "Kate"), {**texas, "shortcut": ""}])
        self.assertEqual([r["shortcut"] for r in rows],
                         ["the answer 'Texas' is in e2's name 'University of Texas at Austin'", "", ""])

    def test_a_2hop_file_without_bridges_is_two_hop(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = write_jsonl(Path(tmp) / "2hop_capital_nocot.jsonl", [reference_row("", "Q?", "Oslo")])
            self.assertEqual(files_card({"2hop_capital_nocot": path}, "files")["tests"]["2hop_capital_nocot"]["kind"],
                             "two_hop")

    def test_style_kind_pairs_and_candidates_of_given_files(self):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "test"
            semi_synthetic_tests(folder, ["Ann Lee-Ray", "Bo Kim-Tay", "Cy Fox-Orr"])
            write_jsonl(folder / "more" / "2hop_no_cot.jsonl", [reference_row("", "Q?", "Oslo", "Kate")])
            files = collect_files([folder])
            self.assertEqual(sorted(files), ["capital", "capital_cot", "capital_shuffled", "more/2hop_no_cot"])
            card = files_card(files, "files")
            tests = card["tests"]
            self.assertEqual({n: (t["style"], t["kind"]) for n, t in tests.items()},
                             {"capital": ("nocot", "atomic"), "capital_cot": ("cot", "atomic"),
                              "capital_shuffled": ("nocot", "atomic"), "more/2hop_no_cot": ("nocot", "two_hop")})
            self.assertEqual(tests["capital_shuffled"]["shuffled_of"], "capital")
            self.assertEqual(card["candidate_sets"]["capital"], sorted(COUNTRIES))
            self.assertEqual(tests["more/2hop_no_cot"]["candidate_set"], "more_2hop")
            self.assertEqual(style_of([reference_row("", "Q?", "x")], "capital_cot"), "cot")
            # A file of a dataset we generated keeps what its card declares: kind, metric, the whole candidate set.
            generated = Path(tmp) / "data"
            write_jsonl(generated / "test" / "a_undemoed.jsonl", [reference_row("", "Q?", "Oslo")])
            spec = {"kind": "hop_a", "style": "nocot", "candidate_set": "cities", "attribute": "", "shuffled_of": "",
                    "metric": "acc_a"}
            (generated / "card.json").write_text(json.dumps({"tests": {"test/a_undemoed": spec},
                                                             "candidate_sets": {"cities": ["Oslo", "Rome", "Lima"]}}))
            card = files_card(collect_files([generated / "test"]), "files")
            self.assertEqual(card["tests"]["a_undemoed"]["metric"], "acc_a")
            self.assertEqual(card["candidate_sets"]["a_undemoed"], ["Lima", "Oslo", "Rome"])
            with self.assertRaisesRegex(UserError, r"test_files: .*nowhere does not exist"):
                collect_files([Path(tmp) / "nowhere"])


class ExperimentPathsTest(unittest.TestCase):
    """Files a YAML names: absolute; under the data root (set, or the folder above holding datasets/); beside it."""

    def test_resolution_order_and_the_missing_file_message(self):
        with tempfile.TemporaryDirectory() as tmp:
            repo = Path(tmp) / "repo"
            at_root = write_jsonl(repo / "datasets" / "a.jsonl", [reference_row("", "Q?", "Oslo")])
            beside = write_jsonl(repo / "experiments" / "datasets" / "a.jsonl", [reference_row("", "Q?", "Oslo")])
            path = repo / "experiments" / "exp.yaml"
            path.write_text(yaml.safe_dump({"train_datasets": [{"name": "a", "dataset_file": "datasets/a.jsonl"}]}))
            self.assertEqual(load_experiment_yaml(path)["train_datasets"][0]["dataset_file"], str(beside))
            shutil.rmtree(repo / "experiments" / "datasets")  # now the first folder above with datasets/ is repo
            self.assertEqual(load_experiment_yaml(path)["train_datasets"][0]["dataset_file"], str(at_root))
            other = write_jsonl(Path(tmp) / "elsewhere" / "datasets" / "a.jsonl", [reference_row("", "Q?", "Oslo")])
            loaded = load_experiment_yaml(path, data_root=str(Path(tmp) / "elsewhere"))
            self.assertEqual(loaded["train_datasets"][0]["dataset_file"], str(other))
            path.write_text(yaml.safe_dump({"eval_datasets": [{"name": "b", "dataset_file": "datasets/b.jsonl"}]}))
            with self.assertRaises(UserError) as caught:
                load_experiment_yaml(path)
            self.assertEqual(str(caught.exception).count("\n"), 0)
            self.assertIn(f"file 'datasets/b.jsonl' not found; looked for {repo / 'datasets/b.jsonl'}, "
                          f"{repo / 'experiments/datasets/b.jsonl'}", str(caught.exception))


@unittest.skipIf(os.environ.get("TWOHOP_SKIP_SLOW") == "1", "slow end-to-end test (TWOHOP_SKIP_SLOW=1)")
class ReferenceExperimentTest(unittest.TestCase):
    """A reference repository (YAML under experiments/, files named from its root) trained and evaluated."""

    @classmethod
    def setUpClass(cls):
        from models import ensure_model, load_model, resolve_model
        from tests.fixtures.train_small import small_data
        cls.tmp = tempfile.TemporaryDirectory()
        root = Path(cls.tmp.name)
        cls.w, cls.repo = root / "w", root / "reference"
        data = small_data(cls.w)
        tiny = resolve_model("tiny", cls.w / "transformers")
        ensure_model(tiny)
        model, tokenizer = load_model(tiny.path)
        model.save_pretrained(cls.w / "transformers" / "local-llama")
        tokenizer.save_pretrained(cls.w / "transformers" / "local-llama")
        cls.write_reference_repo(data)
        cls.yaml = cls.repo / "experiments" / "exp.yaml"
        here = os.getcwd()
        os.chdir(root)  # a relative experiment_config is read from the working directory
        try:
            cls.code, cls.err = cli("--workspace_path", str(cls.w), "--jobs", "evaluate_twohop_spouses",
                                    "--model", "local-llama", "--set", "experiment_config=reference/experiments/exp.yaml",
                                    *SMALL_WORLD)
        finally:
            os.chdir(here)

    @classmethod
    def write_reference_repo(cls, data: Path) -> None:
        people = [r["e1"] for r in read_records(data / "test/2hop_nocot.jsonl")[:6]]
        semi_synthetic_tests(cls.repo / "datasets/semi_synthetic/test", people)
        spouses = cls.repo / "datasets/spouses"
        write_jsonl(spouses / "train.jsonl", read_records(data / "train/2hop_nocot.jsonl")[:40])
        true = read_records(data / "test/2hop_nocot.jsonl")[:5]
        write_jsonl(spouses / "2hop_nocot.jsonl", true)
        questions = {r["question"] for r in true}
        write_jsonl(spouses / "2hop_nocot_shuffled.jsonl",
                    [r for r in read_records(data / "test/2hop_nocot_shuffled.jsonl") if r["question"] in questions])
        write_jsonl(spouses / "list_answers.jsonl", [reference_row(
            "", r["question"], [r["answer"], r["answer"].upper()], [r["answer_intermediate"]]) for r in true[:3]])
        entries = [("2hop_no_cot", "spouses/2hop_nocot"), ("2hop_no_cot_shuffled", "spouses/2hop_nocot_shuffled"),
                   ("list_answers", "spouses/list_answers"), ("capital", "semi_synthetic/test/capital"),
                   ("capital_cot", "semi_synthetic/test/capital_cot"),
                   ("capital_shuffled", "semi_synthetic/test/capital_shuffled")]
        experiment = {"train_datasets": [{"name": "train", "dataset_file": "datasets/spouses/train.jsonl"}],
                      "eval_datasets": [{"name": n, "dataset_file": f"datasets/{f}.jsonl"} for n, f in entries],
                      "evaluations": [{"dataset_file": "datasets/semi_synthetic/test/capital.jsonl", "force_cot": True,
                                       "metric_name": "acc_capital_forced_cot", "max_new_tokens": 12}],
                      "max_steps": 2, "lr_scheduler": "constant", "warmup_ratio": 0.0, "eval_subsample": 8}
        (cls.repo / "experiments").mkdir(parents=True)
        (cls.repo / "experiments/exp.yaml").write_text(yaml.safe_dump(experiment))

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def evaluation(self, subjob: str) -> Path:
        return self.w / f"experiments/evaluate_twohop/{subjob}/local-llama/seed_1"

    def test_the_evaluation_grades_exactly_the_yamls_eval_sets_and_evaluations(self):
        self.assertEqual(self.code, 0, self.err[-3000:])
        results = json.loads((self.evaluation("spouses") / "results.json").read_text())
        counts = {"2hop_no_cot": 5, "list_answers": 3, "capital": 6, "capital_cot": 6,  # shuffled sets are not asked
                  "acc_capital_forced_cot": 6}
        self.assertEqual({t: s["n"] for t, s in results["tests"].items()}, counts)
        self.assertEqual(set(results["loss_gaps"]), {"2hop_no_cot", "capital"})
        predictions = [json.loads(line) for line in (self.evaluation("spouses") / "predictions.jsonl").read_text().splitlines()]
        self.assertEqual({t: sum(p["test"] == t for p in predictions) for t in counts}, counts)
        self.assertIsNone(results["tests"]["capital"]["first_hop"])  # no bridge: not applicable, not 0
        self.assertIsNotNone(results["tests"]["2hop_no_cot"]["first_hop"])
        self.assertIn("| capital | atomic | nocot | 6 |", (self.evaluation("spouses") / "summary.md").read_text())
        self.assertIn("n/a", (self.evaluation("spouses") / "summary.md").read_text())
        listed = next(p for p in predictions if p["test"] == "list_answers")  # graded against its aliases
        self.assertEqual((listed["answer"][1], type(listed["correct"])), (listed["answer"][0].upper(), bool))
        forced = results["tests"]["acc_capital_forced_cot"]  # the evaluations: block, forced CoT, under its name
        self.assertEqual((forced["n"], forced["style"]), (6, "cot"))
        self.assertIn("acc_capital_forced_cot", json.loads((self.evaluation("spouses") / "metrics.json").read_text()))
        self.assertTrue((self.evaluation("spouses") / "lm_eval_tasks" / "twohop_exp_capital.yaml").is_file())

    def files(self, *extra) -> tuple:
        """(results.json, whether the evaluation ran rather than being skipped)."""
        code, err = cli("--workspace_path", str(self.w), "--jobs", "evaluate_twohop_files", "--model", "local-llama",
                        *SMALL_WORLD, *extra)
        self.assertEqual(code, 0, err[-3000:])
        results = json.loads((self.evaluation("files") / "results.json").read_text())
        return results, "evaluate_twohop_files [local-llama, seed 1] done in" in err

    def test_files_on_the_model_and_on_a_finetune_run_and_edits_rerun(self):
        folder = Path(self.tmp.name) / "own_tests"
        shutil.copytree(self.repo / "datasets/semi_synthetic/test", folder)
        results, ran = self.files("--set", f"test_files=[{folder}]", "--set", "max_rows=4")
        self.assertTrue(ran)
        self.assertEqual(set(results["tests"]), {"capital", "capital_cot"})
        self.assertEqual(set(results["loss_gaps"]), {"capital"})
        self.assertIn("acc_capital", results["headline"])
        self.assertTrue(results["model"].endswith("local-llama"))
        self.assertFalse(self.files("--set", f"test_files=[{folder}]", "--set", "max_rows=4")[1])  # same inputs
        rows = (folder / "capital.jsonl").read_text().splitlines()
        (folder / "capital.jsonl").write_text("\n".join(rows[1:]) + "\n")  # an external file changes
        self.assertTrue(self.files("--set", f"test_files=[{folder}]", "--set", "max_rows=4")[1])

        self.assertEqual(self.code, 0, self.err[-3000:])
        results, _ = self.files("--set", f"test_files=[{folder / 'capital.jsonl'}]", "--set", "finetune=finetune_spouses",
                                "--set", f"experiment_config={self.yaml}", "--set", "max_rows=3")
        self.assertTrue(results["model"].endswith("finetune/spouses/local-llama/seed_1/model"), results["model"])
        self.assertEqual(results["tests"]["capital"]["n"], 3)


if __name__ == "__main__":
    unittest.main()
