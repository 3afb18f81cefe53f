"""generate_data on a small world (same code as the reference scale): files, invariants, errors."""
import contextlib
import csv
import io
import json
import tempfile
import unittest
from pathlib import Path

from runner.errors import UserError
from runner.main import main
from twohop.data.records import read_records
from twohop.data import tables
from twohop.data.real_facts import project_chains
from tests.fixtures.train_small import SMALL_WORLD



def generate(workspace, *argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["--workspace_path", str(workspace), *argv])
    return code, err.getvalue()


def files_of(data_dir: Path) -> dict:
    return {str(p.relative_to(data_dir)): p.read_bytes() for p in sorted(data_dir.rglob("*")) if p.is_file()}


class SpousesDatasetTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.w = Path(cls.tmp.name) / "w"
        code, err = generate(cls.w, "--jobs", "generate_data_spouses", *SMALL_WORLD)
        assert code == 0, err
        cls.data = cls.w / "experiments" / "generate_data" / "spouses" / "data"
        cls.card = json.loads((cls.data / "card.json").read_text())
        cls.world = json.loads((cls.data / "world.json").read_text())

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def rows(self, name):
        return read_records(self.data / f"{name}.jsonl")

    def test_every_file_reads_and_card_counts_match(self):
        jsonl = sorted(self.data.rglob("*.jsonl"))
        self.assertEqual(len(jsonl), len(self.card["files"]))
        for path in jsonl:
            name = str(path.relative_to(self.data))[:-len(".jsonl")]
            self.assertEqual(len(read_records(path)), self.card["files"][name], name)
        for name in ("train/a_demoed", "train/b_undemoed", "train/2hop_cot", "train/2hop_nocot", "test/2hop_cot",
                     "test/2hop_nocot", "test/2hop_nocot_shuffled", "test/a_undemoed", "test/b_undemoed",
                     "fewshot/2hop_nocot", "test/couples", "train/samedoc", "train/samedoc_distractor",
                     "train/samedoc_triplets", "test/in_context_nocot_seed1", "test/in_context_cot_seed3"):
            self.assertIn(name, self.card["files"])
        self.assertEqual((len(self.world["demoed"]), len(self.world["undemoed"])), (26, 14))
        self.assertEqual(self.card["files"]["test/2hop_nocot_shuffled"], 4 * 14)

    def test_reference_fields_and_prefixes(self):
        for row in self.rows("train/2hop_nocot"):
            self.assertEqual(row["messages"][0]["role"], "system")
            self.assertEqual(row["messages"][-1], {"role": "assistant", "content": row["answer"]})
            self.assertEqual(row["answer_intermediate"], row["e2"])
            self.assertTrue(row["question"].startswith(row["auxiliary_loss_prefix"]))
            self.assertIn(row["e1"], row["auxiliary_loss_prefix"])
        for row in self.rows("test/2hop_cot"):
            reply = row["messages"][-1]["content"]
            self.assertLess(reply.index(row["e2"]), reply.rindex(row["e3"]))
        for row in self.rows("train/a_demoed"):
            self.assertEqual((row["answer"], row["answer_intermediate"]), (row["e2"], ""))

    def test_no_undemoed_two_hop_question_in_training(self):
        undemoed = {t["e1"] for t in self.world["undemoed"]}
        test_questions = {r["question"] for r in self.rows("test/2hop_nocot")}
        for path in (self.data / "train").glob("*.jsonl"):
            for row in read_records(path):
                self.assertNotIn(row["question"], test_questions, path.name)
                if path.name.startswith("2hop"):
                    self.assertNotIn(row["e1"], undemoed, path.name)

    def test_test_answers_are_in_their_candidate_sets(self):
        for name, test in self.card["tests"].items():
            candidates = set(self.card["candidate_sets"][test["candidate_set"]])
            self.assertAlmostEqual(test["chance"], 1 / len(candidates))
            for row in self.rows(name):
                self.assertIn(row["answer"], candidates, name)

    def test_shuffled_rows_differ_from_the_truth(self):
        truth = {r["question"]: r for r in self.rows("test/2hop_nocot")}
        answers = {r["answer"] for r in truth.values()}
        for row in self.rows("test/2hop_nocot_shuffled"):
            true = truth[row["question"]]
            self.assertEqual(row["true_answer"], true["answer"])
            if answers - {true["answer"]}:
                self.assertNotEqual(row["answer"], true["answer"])
            self.assertEqual(row["messages"][-1]["content"], row["answer"])
            # answer and bridge are permuted jointly: they still form a real (e2, e3) pair
            self.assertIn((row["answer_intermediate"], row["answer"]),
                          {(t["e2"], t["e3"]) for t in self.world["demoed"] + self.world["undemoed"]})

    def test_couple_negatives_are_a_derangement(self):
        spouse = {t["e1"]: t["e2"] for t in self.world["demoed"] + self.world["undemoed"]}
        rows = self.rows("test/couples")
        self.assertEqual(sum(r["answer"] == "Yes" for r in rows), sum(r["answer"] == "No" for r in rows))
        for row in rows:
            self.assertEqual(row["answer"] == "Yes", spouse[row["e1"]] == row["e2"])

    def test_same_document_and_in_context_rows_hold_both_facts(self):
        for name in ("train/samedoc", "train/samedoc_distractor", "train/samedoc_triplets"):
            for row in self.rows(name):
                doc = row["messages"][-1]["content"]
                self.assertIn(row["e2"], doc)
                self.assertIn(row["e3"], doc)
                self.assertIn(row["e1"], doc)
        for seed in (1, 2, 3):
            for row in self.rows(f"test/in_context_nocot_seed{seed}"):
                prompt = row["messages"][-2]["content"]
                facts = prompt.split("\n\n")[0].splitlines()[1:]
                self.assertEqual(len(facts), 2 * (1 + 5))
                self.assertTrue(any(row["e1"] in f and row["e2"] in f for f in facts))
                self.assertTrue(any(row["e2"] in f and row["e3"] in f for f in facts))
                self.assertEqual(len(row["distractor_e3s"]), 5)

    def test_same_config_is_byte_identical_and_another_seed_differs(self):
        with tempfile.TemporaryDirectory() as other:
            self.assertEqual(generate(Path(other) / "a", "--jobs", "generate_data_spouses", *SMALL_WORLD)[0], 0)
            again = Path(other) / "a" / "experiments" / "generate_data" / "spouses" / "data"
            self.assertEqual(files_of(again), files_of(self.data))
            self.assertEqual(generate(Path(other) / "b", "--jobs", "generate_data_spouses", *SMALL_WORLD,
                                      "--set", "data_seed=1")[0], 0)
            reseeded = files_of(Path(other) / "b" / "experiments" / "generate_data" / "spouses" / "data")
            self.assertEqual(reseeded.keys(), files_of(self.data).keys())
            self.assertNotEqual(reseeded["world.json"], files_of(self.data)["world.json"])

    def test_names_never_collide_with_cities_or_each_other(self):
        people = [t[k] for t in self.world["demoed"] + self.world["undemoed"] for k in ("e1", "e2")]
        self.assertEqual(len(people), len(set(people)))
        self.assertFalse(set(people) & set(tables.cities()))


class SemiSyntheticAndTablesTest(unittest.TestCase):
    def test_every_entity_table_is_complete_and_unique(self):
        self.assertEqual(len(tables.entity_types()), 20)
        for entity_type in tables.entity_types():
            spec, rows = tables.entity_table(entity_type)
            self.assertEqual(len(rows), 20, entity_type)
            self.assertEqual(len({r["name"] for r in rows}), 20, entity_type)
            self.assertGreaterEqual(len(spec["attributes"]), 3, entity_type)
            for row in rows:
                for column, value in row.items():
                    self.assertIsInstance(value, str)
                    self.assertTrue(value.strip(), f"{entity_type}: {row['name']} has an empty {column}")

    def test_semi_synthetic_universities_and_its_card(self):
        with tempfile.TemporaryDirectory() as tmp:
            code, err = generate(Path(tmp), "--jobs", "generate_data_universities")
            self.assertEqual(code, 0, err)
            data = Path(tmp) / "experiments" / "generate_data" / "universities" / "data"
            card = json.loads((data / "card.json").read_text())
            self.assertEqual(card["files"]["train/first_hop"], 20 * 20)  # every training phrasing
            # The natural facts for replay: 5 question forms (not the bare one test/b_* asks) and 2 statements.
            self.assertEqual(card["files"]["train/natural_facts_replay"], 20 * 4 * 7)
            # Shortcuts: the answer is a word of the entity's name (University of Texas at Austin -> Texas), for 7
            # of the 20 universities' states; each entity is one person's favorite, so 7 flagged questions.
            self.assertEqual(card["shortcuts"]["test/state_province_nocot"], 7)
            flagged = {r["e2"] for r in read_records(data / "test/state_province_nocot.jsonl") if r["shortcut"]}
            self.assertIn("University of Texas at Austin", flagged)
            self.assertNotIn("Harvard University", flagged)
            # Penn's founding year is disputed (schema.yaml `ambiguous`): no test asks it, and the card says why.
            self.assertIn("disputed", card["ambiguous"]["founding_year"]["University of Pennsylvania"])
            values = tables.entity_table("universities")[1]
            for attribute in ("founding_year", "city", "state_province", "school_color"):
                asked = 19 if attribute == "founding_year" else 20
                nocot = read_records(data / f"test/{attribute}_nocot.jsonl")
                self.assertEqual(len(nocot), asked)
                self.assertEqual(len(read_records(data / f"test/b_{attribute}.jsonl")), asked)
                self.assertEqual(card["files"][f"test/{attribute}_nocot_shuffled"], 5 * asked)
                self.assertEqual(card["tests"][f"test/{attribute}_nocot"]["chance"], 1 / len({r[attribute] for r in values}))
                spec = card["tests"][f"test/{attribute}_nocot_shuffled"]
                self.assertEqual((spec["kind"], spec["style"], spec["attribute"], spec["shuffled_of"]),
                                 ("two_hop", "nocot", attribute, f"test/{attribute}_nocot"))
            # finetune_universities trains and tracks exactly the files the card declares.
            from runner.jobs.finetune import JOB
            finetune = next(s for s in JOB.subjobs if s.name == "universities").default_config(None)
            for entry in finetune["train_datasets"] + finetune["eval_datasets"]:
                self.assertTrue((data / entry["dataset_file"]).is_file(), entry)
            self.assertEqual({f"test/{e['name']}" for e in finetune["eval_datasets"]}, set(card["tests"]))
            # Every hop B and two-hop row lists all 20 universities, so naming MIT does not answer Harvard's state.
            every = sorted(r["name"] for r in values)
            for test in ("b_state_province", "state_province_nocot", "state_province_cot",
                         "state_province_nocot_shuffled"):
                self.assertEqual({tuple(r["bridge_candidates"]) for r in read_records(data / f"test/{test}.jsonl")},
                                 {tuple(every)}, test)
            self.assertIn("Massachusetts Institute of Technology", every)
            favorite = {r["e1"]: r["e2"] for r in read_records(data / "train/first_hop.jsonl")}
            truth = {r["name"]: r["founding_year"] for r in tables.entity_table("universities")[1]}
            for row in read_records(data / "test/founding_year_nocot.jsonl"):
                self.assertEqual(row["answer"], truth[favorite[row["e1"]]])

    def test_templates_are_parsed_once_and_each_caller_gets_its_own_copy(self):
        first = tables.templates("spouses")
        first["two_hop"].append("changed")
        first.pop("hop_a")
        second = tables.templates("spouses")
        self.assertNotIn("changed", second["two_hop"])
        self.assertIn("hop_a", second)
        self.assertEqual(second, tables.read_yaml(tables.DATA / "templates" / "spouses.yaml"))

    def test_the_shipped_tables_hold_101_answers_inside_the_entity_name(self):
        from twohop.data.dataset import shortcut_reason
        flagged = [(t, e["name"], a) for t in tables.ENTITY_TYPES for e in tables.entity_table(t)[1]
                   for a in tables.entity_table(t)[0]["attributes"] if shortcut_reason(e[a], e2=e["name"])]
        self.assertEqual(len(flagged), 101)  # of 1,580 (entity, attribute) pairs
        self.assertEqual(sum(t == "subway_systems" for t, _, _ in flagged), 19)
        self.assertIn(("universities", "University of Chicago", "city"), flagged)

    def test_bad_table_row_and_unknown_type_are_clear_errors(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bad.csv"
            path.write_text("name,year\nAlpha,1900\nBeta,\n")
            with self.assertRaisesRegex(UserError, r"bad\.csv:3: empty value in column 'year'"):
                tables.read_table(path)
            path.write_text("name,year\nAlpha,1900\nAlpha,1901\n")
            with self.assertRaisesRegex(UserError, r"bad\.csv:3: duplicate name 'Alpha'"):
                tables.read_table(path)
        with self.assertRaisesRegex(UserError, "unknown entity type 'dragons'"):
            tables.entity_table("dragons")

    def test_bad_scale_fails_before_anything_is_written(self):
        with tempfile.TemporaryDirectory() as tmp:
            code, err = generate(Path(tmp), "--jobs", "generate_data_spouses", "--set", "n_triplets=3")
            self.assertEqual(code, 2)
            self.assertIn("--set n_triplets=3: expected a whole number >= 4", err)
            self.assertFalse((Path(tmp) / "experiments").exists(), "bad input wrote into the workspace")
            code, err = generate(Path(tmp), "--jobs", "generate_data_natural_facts", "--set", "entity_types=dragons")
            self.assertEqual(code, 2)
            self.assertIn("unknown entity type 'dragons'", err)


class RealFactsAndLoadersTest(unittest.TestCase):
    def test_project_chains_are_many_varied_and_match_the_tables(self):
        chains = project_chains()
        self.assertGreaterEqual(len(chains), 200)
        self.assertGreaterEqual(len({c["relation"] for c in chains}), 8)
        mona = next(c for c in chains if c["id"] == "painting_museum_city:Mona Lisa")
        self.assertEqual((mona["e2"], mona["e3"]), ("Louvre", "Paris"))
        for chain in chains:
            for question in chain["questions"].values():
                self.assertNotIn("{", question)

    def test_hopping_too_late_csv_loads_into_chain_records(self):
        with tempfile.TemporaryDirectory() as tmp:
            csv_path = Path(tmp) / "datasets" / "edenbiran" / "htl" / "two_hop.csv"
            csv_path.parent.mkdir(parents=True)
            with open(csv_path, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["", "e1_label", "e2_label", "e3_label", "e2_aliases", "e3_aliases", "r1_template",
                                 "r2_template", "source_prompt"])
                writer.writerow([0, "Inception", "Christopher Nolan", "London", "['Nolan', 'C']", "['London, UK']",
                                 "the director of {}", "the birthplace of {}", "The birthplace of the director of Inception is"])
            code, err = generate(Path(tmp), "--jobs", "generate_data_real_facts",
                                 "--set", "hopping_too_late_csv=edenbiran/htl/two_hop.csv")
            self.assertEqual(code, 0, err)
            data = Path(tmp) / "experiments" / "generate_data" / "real_facts" / "data"
            (row,) = [json.loads(l) for l in (data / "chains_hopping_too_late.jsonl").read_text().splitlines()]
            self.assertEqual((row["e1"], row["e2"], row["e3"]), ("Inception", "Christopher Nolan", "London"))
            self.assertEqual(row["e2_aliases"], ["Nolan"])  # one-letter aliases dropped, as the reference does
            self.assertEqual(row["questions"]["hop_a"], "Who is the director of Inception?")  # asked as the reference asks
            self.assertEqual(row["questions"]["shortcut_e1"], "What is the birthplace of Inception?")

    def test_reference_repo_rows_load_and_bad_rows_name_line_and_field(self):
        reference_row = {"messages": [{"role": "system", "content": "Answer directly."},
                                      {"role": "user", "content": "Who is Ju's spouse?"},
                                      {"role": "assistant", "content": "Kate"}],
                         "question": "Who is Ju's spouse?", "answer": "Kate", "answer_intermediate": "",
                         "auxiliary_loss_prefix": ""}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "ref.jsonl"
            path.write_text(json.dumps(reference_row) + "\n")
            self.assertEqual(read_records(path), [reference_row])
            path.write_text(json.dumps(reference_row) + "\n" + json.dumps({"messages": []}) + "\n")
            with self.assertRaisesRegex(UserError, r"ref\.jsonl:2: missing field 'answer'"):
                read_records(path)
            path.write_text("")
            with self.assertRaisesRegex(UserError, "is empty"):
                read_records(path)


if __name__ == "__main__":
    unittest.main()
