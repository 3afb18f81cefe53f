"""Real facts you can trust: a chain a name gives away is kept out of the frontier headline, with its
reason, and counted per relation pair; values a reference source would not settle are marked and set
aside; the shipped tables' fixes hold; Hopping-Too-Late templates are asked as full questions."""
import logging
import tempfile
import unittest
from pathlib import Path

from runner.errors import UserError
from twohop.data import tables
from twohop.data.real_facts import as_question, flag_shortcuts, hopping_too_late_chain, project_chains
from twohop.evaluation.frontier.backends import Reply
from twohop.evaluation.frontier.cache import ResponseCache
from twohop.evaluation.frontier.evaluate import ask, summarise, task_prompts
from twohop.reports.frontier import write_summary

CONFIG = {"nocot_max_tokens": 8, "cot_max_tokens": 8}


class Oracle:
    """A back end that knows every fact: both hops and the two-hop question right, both shortcuts wrong."""
    name = "fake:oracle"

    def __init__(self, chains):
        self.cot, self.replies = tables.templates("system_prompts")["cot"], {}
        for chain in chains:
            for task, (question, answer, _, style) in task_prompts(chain).items():
                reply = "I do not know." if task.startswith("shortcut") else answer
                self.replies[(question, style == "cot")] = f"So the answer is {reply}." if style == "cot" else reply

    def identity(self):
        return {"backend": "oracle"}

    def complete_many(self, requests, done):
        replies = [Reply(self.replies[(r.messages[-1]["content"], r.messages[0]["content"] == self.cot)], attempts=1)
                   for r in requests]
        for index, reply in enumerate(replies):
            done(index, reply)
        return replies


class ShortcutFilterTest(unittest.TestCase):
    def test_a_chain_with_the_bridge_in_e1s_name_is_out_of_the_headline_with_its_reason(self):
        wanted = ["subway_city_country:London Underground", "bridge_city_country:Sydney Harbour Bridge",
                  "bridge_city_country:Tower Bridge", "painting_museum_city:Mona Lisa"]
        chains = [c for c in flag_shortcuts(project_chains()) if c["id"] in wanted]
        self.assertEqual(len(chains), 4)
        with tempfile.TemporaryDirectory() as tmp:
            rows = ask(Oracle(chains), ResponseCache(Path(tmp) / "cache.jsonl"), chains, CONFIG, logging.getLogger())
            summary = summarise(rows)
            write_summary({"fake:oracle": summary}, Path(tmp), "t")
            report = (Path(tmp) / "summary.md").read_text()
        underground = {r["task"]: r for r in rows if r["id"] == wanted[0]}
        self.assertEqual(underground["two_hop_nocot"]["shortcut"],
                         "the answer 'London' is in e1's name 'London Underground'")
        self.assertEqual(summary["both_hops_right"]["n"], 4)  # before the filter: every chain passes
        self.assertEqual(summary["headline"]["n"], 2)  # after: Tower Bridge and the Mona Lisa
        self.assertEqual(summary["headline_set_aside"]["n"], 2)  # reported beside it
        self.assertEqual(summary["set_aside"], {"chains": 2, "shortcut": 2, "ambiguous": 0, "fragment": 0})
        self.assertEqual(summary["set_aside_per_relation"], {
            "bridge_city_country": {"chains": 2, "shortcut": 1, "ambiguous": 0, "fragment": 0},
            "painting_museum_city": {"chains": 1, "shortcut": 0, "ambiguous": 0, "fragment": 0},
            "subway_city_country": {"chains": 1, "shortcut": 1, "ambiguous": 0, "fragment": 0}})
        self.assertIn("| subway_city_country | 1 | 1 | 0 | 0 |", report)

    def test_an_answer_inside_its_question_is_a_shortcut(self):
        chain = {"e1": "Tower Bridge", "e2": "London", "e3": "Paris", "e2_aliases": [], "e3_aliases": [],
                 "questions": {"two_hop": "In which country, not Paris, is the city of Tower Bridge?"}}
        (flagged,) = flag_shortcuts([chain])
        self.assertEqual(flagged["shortcut"], "the answer 'Paris' is in the question "
                                              "'In which country, not Paris, is the city of Tower Bridge?'")


class ShippedFactsTest(unittest.TestCase):
    def test_the_guardian_is_based_in_london(self):
        guardian = next(row for row in tables.entity_table("newspapers")[1] if row["name"] == "The Guardian")
        self.assertEqual(guardian["city"], "London")  # since 1964; founded in Manchester in 1821
        chain = next(c for c in project_chains() if c["id"] == "newspaper_city_country:The Guardian")
        self.assertEqual((chain["e2"], chain["e3"]), ("London", "United Kingdom"))

    def test_ambiguous_values_are_marked_with_their_reason_and_checked(self):
        titan = next(c for c in project_chains() if c["id"] == "symphony_composer_country:Titan Symphony")
        self.assertIn("people 'Mahler' birth_country: born in Bohemia", titan["ambiguous"])
        tower = next(c for c in project_chains() if c["id"] == "bridge_city_country:Tower Bridge")
        self.assertEqual(tower["ambiguous"], "")
        rows = [row for row in tables.entity_table("universities")[1] if row["name"] != "University of Pennsylvania"]
        with self.assertRaisesRegex(UserError, "universities.ambiguous: no row with name 'University of Pennsylvania'"):
            tables.ambiguous("universities", rows)


class HoppingTooLateQuestionTest(unittest.TestCase):
    def test_templates_become_full_questions(self):
        cases = {("the capital of {}", "France"): "What is the capital of France?",
                 ("The capital of {} is", "France"): "What is the capital of France?",
                 ("the spouse of {}", "Ada"): "Who is the spouse of Ada?",
                 ("the head of state of {}", "Peru"): "Who is the head of state of Peru?",
                 ("{} has a capital named", "France"): "What is the capital of France?",
                 ("{} is composed by", "Imagine"): "Who is Imagine composed by?",
                 ("{} holds citizenship in", "Ada"): ""}  # no rule: the caller keeps the fragment
        for (template, entity), question in cases.items():
            self.assertEqual(as_question(template, entity), question, template)

    def test_a_chain_is_asked_in_questions_and_a_template_without_a_rule_stays_a_fragment(self):
        row = {"e1_label": "Inception", "e2_label": "Christopher Nolan", "e3_label": "London", "e2_aliases": "[]",
               "e3_aliases": "[]", "r1_template": "the director of {}", "r2_template": "the birthplace of {}",
               "source_prompt": "The birthplace of the director of Inception is"}
        chain = hopping_too_late_chain(row, 2, "two_hop.csv:2")
        self.assertEqual(chain["questions"], {
            "hop_a": "Who is the director of Inception?", "hop_b": "What is the birthplace of Christopher Nolan?",
            "two_hop": "What is the birthplace of the director of Inception?",
            "shortcut_e1": "What is the birthplace of Inception?",
            "shortcut_no_e1": "What is the birthplace of the director?"})
        self.assertEqual(chain["fragment"], "")
        fragment = hopping_too_late_chain({**row, "r2_template": "{} holds citizenship in"}, 3, "two_hop.csv:3")
        self.assertEqual(fragment["questions"]["hop_b"], "Christopher Nolan holds citizenship in")
        self.assertEqual(fragment["questions"]["hop_a"], "Who is the director of Inception?")
        self.assertEqual(fragment["fragment"], "no question rule for '{} holds citizenship in'")


if __name__ == "__main__":
    unittest.main()
