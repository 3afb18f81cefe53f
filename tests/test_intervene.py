"""Interventions on planted mechanisms, whose true answers are known exactly, and the hook layer on
random-init models of every family.

The planted model (`mover_model`) is a 3-layer Llama whose layers are identities except for one
"mover", decoder layer K = 2: its attention has q = k = 0 (uniform causal attention) and V = O =
identity, so every position adds the mean of the normalised states before it; every MLP is zero.
Token E1 carries an "answer feature" (dimension 0) that only the answer token A reads; E1' (the
corrupting name) carries none, and the foil F reads a dimension nothing writes. So the logit
difference A - F is exactly 0 on the corrupted prompt and positive on the clean one, and:
patching t1 recovers 1 before K and 0 from K on, t2 the reverse, r nothing; knocking out t2 -> t1
at K recovers 0 (the other layers' attention outputs are zero, so knocking them out changes nothing).
"""
import json
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from models.tiny import train_tokenizer, vocabulary_corpus
from runner.errors import UserError
from runner.main import main
from runner.files import append_jsonl, resume_jsonl
from tests.fixtures.tiny_families import CONFIGS, random_model
from tests.fixtures.planted import blank_llama
from twohop.interp import backpatching, hooks, patching
from twohop.interp.hooks import Batch, locate, parity_check

PAD, BOS, E1, E1_CORRUPT, ANSWER, FOIL, DEFAULT = 0, 1, 6, 7, 8, 9, 10
HIDDEN, MOVER, LAYERS = 12, 2, 3
CLEAN = [BOS, 2, E1, 3, 4, 5]  # t1 = 2, r = 3 and 4 (and BOS, 2 before e1), t2 = 5
POSITIONS = {"e1": [2], "t1": 2, "r": [0, 1, 3, 4], "t2": 5}


def mover_model(layers: int = LAYERS, mover: int = MOVER) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=12, hidden_size=HIDDEN, intermediate_size=4, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=HIDDEN // 2, tie_word_embeddings=False,
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=11, max_position_embeddings=32)
    config._attn_implementation = "eager"
    model = blank_llama(config)
    with torch.no_grad():
        embeddings = model.model.embed_tokens.weight
        for token in range(12):
            embeddings[token, 2 + token % (HIDDEN - 2)] = 1.0  # every token has its own direction, beyond 0 and 1
        embeddings[E1, 0] = 2.0  # E1's answer feature
        model.lm_head.weight[ANSWER, 0] = 1.0
        model.lm_head.weight[FOIL, 1] = 1.0
        attention = model.model.layers[mover - 1].self_attn
        attention.v_proj.weight.copy_(torch.eye(HIDDEN))
        attention.o_proj.weight.copy_(torch.eye(HIDDEN))
    return model


def planted_item(name: str = "q") -> patching.Item:
    corrupted = [E1_CORRUPT if t == E1 else t for t in CLEAN]
    return patching.Item(name, CLEAN, corrupted, POSITIONS, ANSWER, FOIL)


def grid(summary: dict, kind: str, position: str) -> list:
    return [round(entry["recovered"], 6) for entry in summary[kind][position]]


class PlantedMoverTest(unittest.TestCase):
    def setUp(self):
        self.model = mover_model()

    def test_patching_recovers_exactly_what_the_mover_reads(self):
        rows = patching.patch_chunk(self.model, [planted_item("a"), planted_item("b")], PAD)
        summary = patching.summarise(rows, samples=10)
        self.assertGreater(summary["effect"]["mean"], 0.1)
        self.assertEqual(rows[0]["corrupted"], 0.0)
        self.assertEqual(grid(summary, "patch", "t1"), [1.0, 1.0, 0.0, 0.0])  # states 0..3; the mover reads state 1
        self.assertEqual(grid(summary, "patch", "t2"), [0.0, 0.0, 1.0, 1.0])
        self.assertEqual(grid(summary, "patch", "r"), [0.0, 0.0, 0.0, 0.0])  # written at K, read by nobody after
        self.assertEqual(grid(summary, "knockout", "t2->t1"), [1.0, 0.0, 1.0])  # decoder layers 1..3

    def test_left_padding_changes_nothing(self):
        short = patching.Item("short", CLEAN[1:], [t if t != E1 else E1_CORRUPT for t in CLEAN[1:]],
                              {"e1": [1], "t1": 1, "r": [0, 2, 3], "t2": 4}, ANSWER, FOIL)
        alone = patching.patch_chunk(self.model, [short], PAD)
        padded = patching.patch_chunk(self.model, [planted_item(), short], PAD)[1::2]
        for a, p in zip(alone, padded):
            self.assertAlmostEqual(a["intervened"], p["intervened"], places=5)
        self.assertEqual(grid(patching.summarise(padded, 10), "patch", "t1"), [1.0, 1.0, 0.0, 0.0])

    def test_parity_passes_and_a_hook_that_changes_the_output_is_refused(self):
        batch = Batch.left_padded([CLEAN, CLEAN[2:]], PAD)
        report = parity_check(self.model, batch, knockout_layers=range(1, LAYERS + 1))
        self.assertEqual(max(report.values()), 0.0)
        with mock.patch.object(hooks, "_edit_cells", lambda edits, batch, combine, *rest: lambda s, h: h + 1e-3):
            with self.assertRaises(UserError) as caught:
                parity_check(self.model, batch)
        self.assertNotIn("\n", str(caught.exception))
        self.assertIn("parity check failed", str(caught.exception))

    def test_knockout_needs_eager_attention(self):
        self.model.config._attn_implementation = "sdpa"
        batch = Batch.left_padded([CLEAN], PAD)
        with self.assertRaisesRegex(UserError, "eager"):
            with hooks.knockout(self.model, MOVER, patching.knockout_cells(batch, [planted_item()], "t1"), batch):
                pass


class StubTokenizer:
    """What back-patching asks of a tokenizer, for the planted model's 12 tokens: a reply is its token ids."""
    pad_token_id, eos_token_id = PAD, 11

    @staticmethod
    def batch_decode(tokens, skip_special_tokens=True):
        return [" ".join(str(t) for t in row.tolist() if t != PAD) for row in tokens]


def planted_query(name: str, ids=CLEAN, positions=POSITIONS) -> backpatching.Query:
    return backpatching.Query(name, ids, positions, {"answer": str(ANSWER), "e1": str(E1), "answer_intermediate": ""})


def hop_too_late_model() -> LlamaForCausalLM:
    """2 layers answering too late: decoder layer 1's MLP is the second hop (bridge feature, dimension 3 ->
    answer feature, dimension 1), decoder layer 2 the first (its attention moves E1's feature, dimension 0,
    to every later position as the bridge feature). The answer never forms; a default token wins."""
    model = mover_model(layers=2, mover=2)
    with torch.no_grad():
        embeddings = model.model.embed_tokens.weight
        embeddings.zero_()
        for token in range(12):
            embeddings[token, 4 + token % 8] = 1.0
        embeddings[E1, 0] = 2.0
        mlp = model.model.layers[0].mlp
        mlp.gate_proj.weight[0, 3], mlp.up_proj.weight[0, 3], mlp.down_proj.weight[1, 0] = 4.0, 4.0, 10.0
        attention = model.model.layers[1].self_attn
        attention.v_proj.weight.zero_()
        attention.v_proj.weight[3, 0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[ANSWER, 1] = 1.0
        model.lm_head.weight[DEFAULT, 4 + CLEAN[-1] % 8] = 0.5  # reads the last prompt token
    return model


class PlantedBackpatchTest(unittest.TestCase):
    def setUp(self):
        self.model = mover_model()  # layer 3 is an identity: state 3 == state 2
        self.queries = [planted_query("a"), planted_query("b", CLEAN[1:], {"e1": [1], "t1": 1, "r": [0, 2, 3], "t2": 4})]

    def replies(self, rows) -> dict:
        return {backpatching.row_key(r): r["reply"] for r in rows}

    def test_back_patching_across_an_identity_layer_changes_nothing(self):
        pairs = [(3, 2), (2, 1)]
        rows = [r for chunk in backpatching.grid_rows(self.model, StubTokenizer, self.queries, pairs, ("t2", "t1"), 8, 3)
                for r in chunk]
        self.assertEqual(len(rows), 2 * (1 + 2 * 2))
        replies = self.replies(rows)
        for q in ("a", "b"):
            baseline = replies[(q, "none", None, None)]
            self.assertTrue(baseline.startswith(str(ANSWER)), baseline)
            self.assertEqual(replies[(q, "t2", 3, 2)], baseline)
            self.assertEqual(replies[(q, "t1", 3, 2)], baseline)
        batch = Batch.left_padded([q.ids for q in self.queries], PAD)
        cache = backpatching.clean_states(self.model, batch, self.queries)
        torch.testing.assert_close(cache["t2"][:, 3], cache["t2"][:, 2], atol=0, rtol=0)
        self.assertFalse(torch.equal(cache["t2"][:, 2], cache["t2"][:, 1]))  # the mover wrote there
        summary = backpatching.summarise(rows)
        self.assertEqual((summary["n"], summary["right"]), (2, 2))
        preserved = {(e["position"], e["source"], e["target"]): e["preserve"]["rate"] for e in summary["pairs"]}
        self.assertEqual(preserved[("t2", 3, 2)], 1.0)

    def test_back_patching_fixes_a_model_that_hops_too_late_only_from_the_mover_to_before_the_second_hop(self):
        model = hop_too_late_model()
        control = planted_query("control", [E1_CORRUPT if t == E1 else t for t in CLEAN])
        pairs = backpatching.layer_pairs(3)
        rows = [r for chunk in backpatching.grid_rows(model, StubTokenizer, [self.queries[0], control], pairs,
                                                      ("t2", "t1"), 16, 1) for r in chunk]
        fixed = {(r["item"], r["position"], r["source"], r["target"]) for r in rows if r["correct"]}
        self.assertEqual(fixed, {("a", "t2", 2, 0)})  # source >= the mover's output, target before the second hop
        self.assertEqual({r["reply"] for r in rows if r["item"] == "control"}, {str(DEFAULT)})
        summary = backpatching.summarise([r for r in rows if r["item"] == "a"])
        self.assertEqual((summary["accuracy"]["rate"], summary["oracle_fix"]["any"]["rate"]), (0.0, 1.0))
        self.assertEqual(summary["best_pair"]["fix"]["rate"], 1.0)
        self.assertEqual((summary["best_pair"]["source"], summary["best_pair"]["target"]), (2, 0))

    def test_a_killed_grid_continues_where_it_stopped(self):
        pairs = backpatching.layer_pairs(LAYERS + 1)
        self.assertEqual(pairs, [(1, 0), (2, 0), (3, 0), (2, 1), (3, 1), (3, 2)])
        self.assertEqual(backpatching.layer_pairs(LAYERS + 1, stride=2), [(2, 0), (3, 0), (3, 2)])
        full = [r for c in backpatching.grid_rows(self.model, StubTokenizer, self.queries, pairs, ["t2"], 4, 2) for r in c]
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "rows.jsonl"
            first = next(backpatching.grid_rows(self.model, StubTokenizer, self.queries, pairs, ["t2"], 4, 2))
            append_jsonl(log, first)
            with open(log, "a") as f:
                f.write('{"item": "a", "cut sh')  # the kill
            done = resume_jsonl(log)
            self.assertEqual(done, first)
            for chunk in backpatching.grid_rows(self.model, StubTokenizer, self.queries, pairs, ["t2"], 4, 2,
                                                {backpatching.row_key(r) for r in done}):
                append_jsonl(log, chunk)
            self.assertEqual(self.replies(resume_jsonl(log)), self.replies(full))
            self.assertEqual(len(resume_jsonl(log)), len(full))


class FamiliesTest(unittest.TestCase):
    """The hook layer on a random-init model of every family, with the embedded tokenizer's multi-token names."""

    @classmethod
    def setUpClass(cls):
        cls.tokenizer = train_tokenizer(vocabulary_corpus(), 4096)

    def prompts(self):
        rows = [("Ada Hughes-Marsjanska", "Where was Ada Hughes-Marsjanska's spouse born?"),
                ("Bo", "In which city was the spouse of Bo born?")]
        return [(e1, q, self.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                           tokenize=False)) for e1, q in rows]

    def test_positions_are_found_by_span_with_multi_token_names(self):
        (e1, question, prompt), _ = self.prompts()
        ids, where = locate(self.tokenizer, prompt, question, e1)
        self.assertGreater(len(where["e1"]), 1, "the test needs a multi-token name")
        decode = lambda positions: self.tokenizer.decode([ids[p] for p in positions]).strip()  # noqa: E731
        self.assertEqual(decode(where["e1"]), e1)
        self.assertEqual(where["t1"], where["e1"][-1])
        self.assertEqual(where["t2"], len(ids) - 1)
        self.assertEqual(decode(where["r"]).replace(" ", ""), "Wherewas'sspouseborn?")
        self.assertEqual(ids[-1], self.tokenizer.convert_tokens_to_ids("<|assistant|>"))
        with self.assertRaisesRegex(UserError, "does not occur"):
            locate(self.tokenizer, prompt, question, "Nobody")

    def test_corrupted_items_differ_from_the_clean_ones_only_in_e1(self):
        def row(e1, e3):
            question = f"Where was {e1}'s spouse born?"
            return {"messages": [{"role": "system", "content": "Answer directly."}, {"role": "user", "content": question},
                                 {"role": "assistant", "content": e3}], "question": question, "answer": e3, "e1": e1}
        rows = [row("Ada Hughes-Marsjanska", "Oslo"), row("Bo", "Lima"), row("Thalia Donnelly-Rosenthal", "Rome")]
        items, skipped = patching.pair_items(self.tokenizer, {"test": rows})
        self.assertEqual((len(items), skipped), (2, 1))  # Bo's name has no partner of its length
        for item in items:
            differ = [i for i, (a, b) in enumerate(zip(item.clean, item.corrupted)) if a != b]
            self.assertTrue(differ and set(differ) <= set(item.positions["e1"]), differ)
            self.assertEqual(len(item.clean), len(item.corrupted))
            self.assertEqual(self.tokenizer.decode([item.corrupted[p] for p in item.positions["e1"]]).strip(),
                             item.info["e1_corrupt"])
            self.assertNotEqual(item.answer, item.foil)

    def test_every_family_passes_parity_and_left_padding_keeps_the_cells(self):
        found = [locate(self.tokenizer, p, q, e1) for e1, q, p in self.prompts()]
        batch = Batch.left_padded([ids for ids, _ in found], self.tokenizer.pad_token_id)
        rows, columns = batch.cells([where["t1"] for _, where in found])
        for model_type in CONFIGS:
            with self.subTest(model_type):
                model = random_model(model_type, self.tokenizer, attn_implementation="eager")
                report = parity_check(model, batch, knockout_layers=(1, 2))
                self.assertLess(max(report.values()), 1e-4)
                self.assertEqual(batch.input_ids[rows, columns].tolist(), [ids[w["t1"]] for ids, w in found])
                alone = hooks.final_logits(model, Batch.left_padded([found[1][0]], self.tokenizer.pad_token_id))
                torch.testing.assert_close(hooks.final_logits(model, batch)[1:], alone, atol=1e-5, rtol=1e-4)
                # Knocking out t2 -> t1 in layer 2 (global attention in every family) changes the logits at t2
                # and nowhere else.
                cut = (rows, torch.full_like(rows, batch.width - 1), columns)
                before = hooks.final_logits(model, batch, last_only=False)
                with hooks.knockout(model, 2, cut, batch):
                    after = hooks.final_logits(model, batch, last_only=False)
                changed = (after - before).abs().amax(-1) > 1e-6
                self.assertEqual(changed.nonzero().tolist(), [[0, batch.width - 1], [1, batch.width - 1]])


class InterveneJobTest(unittest.TestCase):
    """Both sub-jobs through the real runner, on the untrained tiny model (--model as it is)."""

    def test_patch_and_backpatch_write_the_house_outputs(self):
        with tempfile.TemporaryDirectory() as tmp:
            w = Path(tmp) / "w"
            code = main(["--workspace_path", str(w), "--jobs", "intervene_patch", "intervene_backpatch", "--set",
                         "model_from=cli", "--set", "max_items=6", "--set", "intervene_backpatch.max_new_tokens=3"])
            self.assertEqual(code, 0)
            runs = w / "experiments" / "intervene"
            patch, back = runs / "patch/tiny-h128-l2/seed_1", runs / "backpatch/tiny-h128-l2/seed_1"
            for name in ("rows.jsonl", "results.json", "summary.md", "patching_heatmap.png", "knockout.png"):
                self.assertTrue((patch / name).is_file(), name)
            rows = [json.loads(line) for line in (patch / "rows.jsonl").read_text().splitlines()]
            self.assertEqual(len(rows), 6 * (3 * 3 + 2))  # 6 items x (states 0..2 x {t1, r, t2} + knockout at 1, 2)
            results = json.loads((patch / "results.json").read_text())
            self.assertEqual(results["summary"]["n"], 6)
            self.assertEqual([e["recovered"] for e in results["summary"]["patch"]["t2"]][-1], 1.0)  # the last state
            self.assertEqual(max(results["parity"].values()), 0.0)
            back_rows = (back / "rows.jsonl").read_text().splitlines()
            self.assertEqual(len(back_rows), 6 * (1 + 3))  # unpatched + pairs (1,0), (2,0), (2,1) at t2
            self.assertTrue((back / "backpatch.png").is_file())
            self.assertIn("Oracle fix rate", (back / "summary.md").read_text())


if __name__ == "__main__":
    unittest.main()
