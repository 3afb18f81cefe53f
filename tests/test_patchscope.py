"""Patchscopes on a planted model whose decoded entities are known exactly, the self-Patchscope
identity, classification by alias match, description prompts, and the sub-job through the runner.

The planted model (`hop_model`) is a 3-layer Llama with one-hot token embeddings, an identity
unembedding (each position predicts the token its state points to most) and no attention: decoder
layer 1's MLP is the first hop (E1's direction -> +10 on E2's), layer 2 is an identity, layer 3's MLP
the second hop (E2 -> +23 on E3). So at t1 (the E1 token) state 0 points to E1, states 1-2 to E2 and
state 3 to E3; nothing moves to t2. Written into the last token of a description prompt at the last
state (3), each state is decoded as it is; at the same state ("same"), the target's own later layers
make the hops again, so every state of t1 decodes as E3.
"""
import json
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from runner.errors import UserError
from runner.main import main
from models.tiny import train_tokenizer, vocabulary_corpus
from tests.test_intervene import StubTokenizer  # not a TestCase: safe to import by name
from tests.fixtures.planted import blank_llama
from tests.fixtures.tiny_families import CONFIGS, random_model
from twohop.interp import patchscope
from twohop.interp.backpatching import Query
from twohop.interp.hooks import Batch, final_logits, locate, patch_states

PAD, BOS, F, G, X, T2, E1, E2, E3 = 0, 1, 2, 3, 4, 5, 6, 7, 8
HIDDEN, LAYERS = 12, 3
SOURCE = [BOS, F, E1, G, T2]  # t1 = 2 (E1), t2 = 4
TARGET = [BOS, F, X]  # the placeholder X is the last token


def hop_model() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=12, hidden_size=HIDDEN, intermediate_size=2, num_hidden_layers=LAYERS,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=HIDDEN // 2, tie_word_embeddings=False,
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=11, max_position_embeddings=32)
    model = blank_llama(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(12, HIDDEN))
        model.lm_head.weight.copy_(torch.eye(12, HIDDEN))
        for layer, (read, write, scale) in ((0, (E1, E2, 0.86)), (2, (E2, E3, 2.0))):  # silu(3.46) * 3.46 ~ 11.6
            mlp = model.model.layers[layer].mlp
            mlp.gate_proj.weight[0, read], mlp.up_proj.weight[0, read], mlp.down_proj.weight[write, 0] = 1.0, 1.0, scale
    return model


def record(e1=str(E1), e2=str(E2), e3=str(E3)) -> dict:
    return {"e1": e1, "answer_intermediate": e2, "answer": e3}


def planted(name: str = "q", pad: int = 0) -> tuple:
    """(query, [Description]) of the planted source prompt, `pad` filler tokens longer."""
    query = Query(name, [BOS] + [G] * pad + SOURCE[1:], {"t1": 2 + pad, "t2": 4 + pad}, record())
    controls = {"text_e1": [BOS, F, E1], "text_e2": [BOS, F, E2], "text_e3": [BOS, F, E3], "placeholder": TARGET}
    return query, [patchscope.Description("entity", TARGET, 2, controls)]


def run_rows(model, items, target_state, positions=("t1", "t2"), batch_size=64, done=frozenset()) -> list:
    queries = [q for q, _ in items]
    pairs = patchscope.state_pairs(LAYERS + 1, [], target_state)
    return [r for chunk in patchscope.scope_rows(model, StubTokenizer, queries, {q.id: d for q, d in items}, positions,
                                                 pairs, batch_size, 3, done) for r in chunk]


def labels(rows, position, item="q") -> list:
    found = sorted((r["source"], r["label"]) for r in rows if r["item"] == item and r["position"] == position)
    return [label for _, label in found]


class PlantedPatchscopeTest(unittest.TestCase):
    def setUp(self):
        self.model = hop_model()

    def test_the_decoded_entity_is_known_exactly(self):
        rows = run_rows(self.model, [planted()], target_state=LAYERS)
        self.assertEqual(labels(rows, "t1"), ["e1", "e2", "e2", "e3"])  # states 0..3, each decoded as it is
        self.assertEqual(labels(rows, "t2"), ["other"] * 4)  # nothing moves to t2
        replies = {(r["position"], r["source"]): r["generation"] for r in rows}
        self.assertEqual(replies[("t1", 1)], f"{E2} {E3} {E3}")  # the generated E2 then hops on to E3
        self.assertEqual(replies[("question", None)], f"{T2} {T2} {T2}")
        summary = patchscope.summarise(rows)
        e2_at_t1 = summary["prompts"]["entity"]["readable"]["e2_at_t1"]["all"]
        self.assertEqual((e2_at_t1["rate"], e2_at_t1["earliest_min"], e2_at_t1["earliest"]), (1.0, 1, {"1": 1}))
        self.assertEqual(summary["prompts"]["entity"]["readable"]["e3_at_t2"]["all"]["rate"], 0.0)
        self.assertEqual(summary["prompts"]["entity"]["readable"]["e1_at_t1"]["all"]["earliest"], {"0": 1})
        self.assertEqual((summary["n"], summary["wrong"]), (1, 1))

    def test_a_same_state_target_makes_the_hops_itself_and_the_text_control_shows_it(self):
        rows = run_rows(self.model, [planted()], target_state="same")
        self.assertEqual(labels(rows, "t1"), ["e3"] * 4)
        self.assertEqual({r["target"] for r in rows if r["position"] == "t1"}, set(range(LAYERS + 1)))
        self.assertEqual(labels(run_rows(self.model, [planted()], target_state=2), "t1"), ["e1", "e3", "e3", "e3"])
        controls = {r["position"]: r["label"] for r in rows if r["source"] is None}
        self.assertEqual(controls, {"question": "other", "text_e1": "e3", "text_e2": "e3", "text_e3": "e3",
                                    "placeholder": "other"})

    def test_left_padding_and_chunking_change_nothing(self):
        alone = run_rows(self.model, [planted("long", pad=2)], target_state=LAYERS)
        together = run_rows(self.model, [planted(), planted("long", pad=2)], target_state=LAYERS, batch_size=5)
        self.assertEqual(sorted(json.dumps(r, sort_keys=True) for r in alone),
                         sorted(json.dumps(r, sort_keys=True) for r in together if r["item"] == "long"))
        self.assertEqual(len({patchscope.row_key(r) for r in together}), len(together))

    def test_a_killed_run_continues_to_the_same_rows(self):
        full = run_rows(self.model, [planted()], target_state=LAYERS)
        pairs = patchscope.state_pairs(LAYERS + 1, [], LAYERS)
        first = next(patchscope.scope_rows(self.model, StubTokenizer, [planted()[0]], {"q": planted()[1]}, ["t1", "t2"],
                                           pairs, 4, 3))
        rest = run_rows(self.model, [planted()], target_state=LAYERS, done={patchscope.row_key(r) for r in first})
        self.assertEqual(len(first), 4)
        as_set = lambda rows: {json.dumps(r, sort_keys=True) for r in rows}  # noqa: E731
        self.assertEqual(as_set(first + rest), as_set(full))
        self.assertEqual(len(first + rest), len(full))

    def test_a_self_patchscope_is_the_identity(self):
        query, _ = planted()
        states = range(LAYERS + 1)
        self.assertEqual(patchscope.self_check(self.model, StubTokenizer, query, ["t1", "t2"], states, 3), 8)
        batch = Batch.left_padded([query.ids], PAD)
        cache = patchscope.clean_states(self.model, batch, [query])
        with torch.no_grad():
            before = final_logits(self.model, batch, last_only=False)
            for state in range(LAYERS + 1):
                for position in ("t1", "t2"):
                    cells = batch.cells([query.positions[position]])
                    with patch_states(self.model, {state: (*cells, cache[position][:, state])}, batch):
                        torch.testing.assert_close(final_logits(self.model, batch, last_only=False), before,
                                                   atol=0, rtol=0)
        # States of another prompt (its last token G, not T2) written back: the reply changes and the check refuses.
        other = Query("other", SOURCE[:-1] + [G], query.positions, query.record)
        foreign = patchscope.clean_states(self.model, Batch.left_padded([other.ids], PAD), [other])
        with mock.patch.object(patchscope, "clean_states", lambda *a: foreign):
            with self.assertRaisesRegex(UserError, "self-Patchscope check failed") as caught:
                patchscope.self_check(self.model, StubTokenizer, query, ["t2"], states, 3)
        self.assertNotIn("\n", str(caught.exception))


class ClassifyTest(unittest.TestCase):
    UNIVERSITY = {"e1": ("Amara Lindqvist-Andersson", ()), "e2": ("University of Texas at Austin", ("UT Austin",)),
                  "e3": ("Austin", ())}

    def test_the_first_entity_named_wins_and_a_name_inside_another_does_not_count(self):
        classify = lambda text: patchscope.classify(text, self.UNIVERSITY)  # noqa: E731
        self.assertEqual(classify("University of Texas at Austin, founded in 1883"), {"label": "e2", "named": ["e2"]})
        self.assertEqual(classify("Austin, home of the University of Texas at Austin"),
                         {"label": "e3", "named": ["e3", "e2"]})
        self.assertEqual(classify("It is UT Austin."), {"label": "e2", "named": ["e2"]})
        self.assertEqual(classify("amara lindqvist andersson likes Austin"), {"label": "e1", "named": ["e1", "e3"]})
        self.assertEqual(classify("Austinite\nAustin"), {"label": "other", "named": []})  # the first line only
        self.assertEqual(patchscope.classify("Rome", patchscope.entities(
            {"e1": "Bo", "answer_intermediate": ["Ada Ng", "Ada"], "answer": "Oslo", "aliases": ["Rome"]})),
            {"label": "e3", "named": ["e3"]})

    def test_a_name_inside_another_entity_the_bridge_could_be_does_not_count(self):
        harvard = {"e1": ("Ju Ng", ()), "e2": ("Harvard University", ()), "e3": ("Massachusetts", ())}
        mit = "Massachusetts Institute of Technology"
        self.assertEqual(patchscope.classify(mit, harvard), {"label": "e3", "named": ["e3"]})
        candidates = ["Harvard University", mit]
        self.assertEqual(patchscope.classify(mit, harvard, candidates), {"label": "other", "named": []})
        self.assertEqual(patchscope.classify("Harvard University, in Massachusetts", harvard, candidates),
                         {"label": "e2", "named": ["e2", "e3"]})


class SummaryTest(unittest.TestCase):
    @staticmethod
    def row(item, position, label, source=None, generation="g"):
        return {"item": item, "prompt": "entity", "position": position, "source": source, "target": source,
                "label": label, "generation": generation}

    def test_what_the_unpatched_placeholder_prompt_names_is_not_read_from_the_state(self):
        rows = [{"item": i, "prompt": None, "position": "question", "source": None, "target": None, "label": "other",
                 "generation": "", "correct": i == "b"} for i in "abc"]
        rows += [self.row("a", "placeholder", "e2"), self.row("a", "t1", "e2", 0), self.row("a", "t1", "e2", 1)]
        rows += [self.row("b", "placeholder", "other"), self.row("b", "t1", "other", 0), self.row("b", "t1", "e2", 1),
                 self.row("b", "t1", "e2", 2, generation="h")]
        rows += [self.row("c", "placeholder", "other"), self.row("c", "t1", "e3", 0, generation="h")]
        summary = patchscope.summarise(rows)
        found = summary["prompts"]["entity"]
        e2 = found["readable"]["e2_at_t1"]
        self.assertEqual((e2["all"]["rate"], e2["all"]["control_names_it"], e2["all"]["earliest"]),
                         (1 / 3, 1, {"1": 1}))  # a's e2 is the placeholder prompt's own answer
        self.assertEqual((e2["right"]["rate"], e2["right"]["n"], e2["wrong"]["rate"]), (1.0, 1, 0.0))
        self.assertEqual([e["e2"]["rate"] for e in found["by_source"]["t1"]], [1 / 3, 1.0, 1.0])  # states 0, 1, 2
        self.assertEqual([e["changed"]["rate"] for e in found["by_source"]["t1"]], [1 / 3, 0.0, 1.0])
        self.assertEqual(summary["accuracy"]["rate"], 1 / 3)


class DescriptionPromptTest(unittest.TestCase):
    """Description prompts with the embedded tokenizer (chat template, multi-token names), and the
    self-Patchscope identity on a random-init model of every family."""

    @classmethod
    def setUpClass(cls):
        cls.tokenizer = train_tokenizer(vocabulary_corpus(), 4096)
        rows = [("Ada Hughes-Marsjanska", "Bo Okafor-Lindqvist", "Oslo"), ("Cy Donnelly-Rosenthal", "Di Yamamoto", "Lima"),
                ("Ed Falkenberg", "Oslo Smith", "Rome"), ("Flo Nowak", "Gus Nowak", "Kyoto")]
        cls.queries = []
        for e1, e2, e3 in rows:
            question = f"In which city was the spouse of {e1} born?"
            prompt = cls.tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                       add_generation_prompt=True, tokenize=False)
            ids, positions = locate(cls.tokenizer, prompt, question, e1)
            cls.queries.append(Query(e1, ids, positions, {"e1": e1, "answer_intermediate": e2, "answer": e3}))

    def test_the_placeholder_is_one_token_and_the_controls_write_the_names(self):
        for style in ("chat", "raw"):
            described = patchscope.descriptions(self.tokenizer, self.queries, ["entity", "identity"], style)
            for query in self.queries:
                for d in described[query.id]:
                    with self.subTest(style=style, kind=d.kind):
                        self.assertEqual(self.tokenizer.decode([d.ids[d.placeholder]]).strip(), "x")
                        text = self.tokenizer.decode(d.controls["text_e2"])
                        self.assertIn(query.record["answer_intermediate"], text)
                        self.assertEqual(d.controls["placeholder"], d.ids)
                        if style == "raw":
                            self.assertEqual(d.placeholder, len(d.ids) - 1)
        raw = {q.id: self.tokenizer.decode(d.ids) for q in self.queries
               for d in patchscope.descriptions(self.tokenizer, self.queries, ["entity"], "raw")[q.id]}
        # The few-shot lines never name an item's own entities, nor a name containing one ("Oslo Smith").
        self.assertEqual(raw["Ada Hughes-Marsjanska"].count("\n"), patchscope.SHOTS)
        for own in ("Ada Hughes-Marsjanska", "Bo Okafor-Lindqvist", "Oslo"):
            self.assertNotIn(own, raw["Ada Hughes-Marsjanska"])
        self.assertEqual(patchscope.render_style(self.tokenizer, "auto"), "chat")

    def test_a_self_patchscope_is_the_identity_on_every_family(self):
        for model_type in CONFIGS:
            with self.subTest(model_type):
                model = random_model(model_type, self.tokenizer)
                checked = patchscope.self_check(model, self.tokenizer, self.queries[0], ["t1", "t2"], range(3), 3)
                self.assertEqual(checked, 6)

    def test_state_pairs_and_states_outside_the_model_are_refused(self):
        self.assertEqual(patchscope.state_pairs(3, [], "same"), [(0, 0), (1, 1), (2, 2)])
        self.assertEqual(patchscope.state_pairs(3, [2, 0], 1), [(2, 1), (0, 1)])
        self.assertEqual(patchscope.state_pairs(2, [], "all"), [(0, 0), (0, 1), (1, 0), (1, 1)])
        with self.assertRaisesRegex(UserError, "states 0..2"):
            patchscope.state_pairs(3, [0, 3], "same")
        with self.assertRaisesRegex(UserError, r"states \[5\]"):
            patchscope.state_pairs(3, [], 5)


class PatchscopeJobTest(unittest.TestCase):
    def test_the_sub_job_writes_the_house_outputs(self):
        with tempfile.TemporaryDirectory() as tmp:
            w = Path(tmp) / "w"
            code = main(["--workspace_path", str(w), "--jobs", "intervene_patchscope", "--set", "model_from=cli",
                         "--set", "max_items=4", "--set", "max_new_tokens=3"])
            self.assertEqual(code, 0)
            run = w / "experiments" / "intervene" / "patchscope/tiny-h128-l2/seed_1"
            for name in ("rows.jsonl", "results.json", "summary.md", "patchscope.png"):
                self.assertTrue((run / name).is_file(), name)
            rows = [json.loads(line) for line in (run / "rows.jsonl").read_text().splitlines()]
            # Per item: the question, and per prompt 4 controls and t1 / t2 at 3 states.
            self.assertEqual(len(rows), 4 * (1 + 2 * (4 + 2 * 3)))
            results = json.loads((run / "results.json").read_text())
            self.assertEqual((results["render"], results["source_states"], results["self_check"], results["pairs"]),
                             ("chat", [0, 1, 2], 6, 3))
            self.assertEqual(set(results["summary"]["prompts"]["entity"]["readable"]),
                             {"e2_at_t1", "e3_at_t2", "e1_at_t1", "e2_at_t2"})
            self.assertIn("e2 at t1", (run / "summary.md").read_text())


if __name__ == "__main__":
    unittest.main()
