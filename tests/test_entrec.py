"""Entity recall and the consistency derivative (Yang et al. 2024) on planted mechanisms whose scores
are known exactly, against a float64 central difference, and through the runner.

The planted model (`recall_model`) is the 3-layer mover of tests/test_intervene.py (decoder layer 2's
attention has q = k = 0 and V = identity; every other attention output is zero) with the first hop
planted in decoder layer 1's MLP: at E1's position (E1's own direction, dimension 8) it writes a
"bridge feature" along dimension 0, which only the bridge token B (e2's first token) reads in the
unembedding. So at E1 (the mention's end) ENTREC is exactly -log V at state 0 (all logits zero), and
from state 1 on a value computed here by hand from the construction; on the e1-substituted prompt
(E1' has no feature) it stays -log V, so the first hop is a tie at state 0 and a success from state 1
on. The mover's output also copies the bridge feature into an "answer feature" (dimension 1) that the
answer A reads: the second hop. The one-hop prompt ends in a token carrying the answer feature, so
raising the recall at E1 where the mover reads it (states 0 and 1) makes the two answers agree more
(a positive derivative), and nothing reads state 2 at E1 (a zero one). With the mover cut, the
consistency score's gradient at E1 is identically zero, which is refused.
"""
import json
import math
import tempfile
import unittest
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from models.tiny import train_tokenizer, vocabulary_corpus
from runner.errors import UserError
from runner.main import main
from twohop.interp import entity_recall
from twohop.interp.entity_recall import Item, Prompt
from twohop.interp.hooks import Batch, add_to_states, read_states
from tests.test_intervene import BOS, E1, E1_CORRUPT, HIDDEN, PAD, mover_model

BRIDGE, ANSWER, RELATION, OTHER_RELATION, ANSWER_CUE = 8, 9, 2, 11, 10
GATE, UP, DOWN = 1.0, 1.0, 0.1  # the first-hop MLP's weights
EPS = 1e-6  # LlamaConfig's rms_norm_eps
TWO_HOP = [BOS, RELATION, E1, 3, 4, 5]  # the mention ends at E1 (index 2); the last token reads the answer
ONE_HOP = [BOS, 3, ANSWER_CUE]  # a one-hop prompt whose last token carries the answer feature
VOCAB = 12


def recall_model(mover: bool = True) -> LlamaForCausalLM:
    model = mover_model(layers=3, mover=2)
    with torch.no_grad():
        model.model.embed_tokens.weight[E1, 0] = 0.0  # E1 no longer carries the feature: layer 1's MLP writes it
        mlp = model.model.layers[0].mlp
        mlp.gate_proj.weight[0, 8], mlp.up_proj.weight[0, 8], mlp.down_proj.weight[0, 0] = GATE, UP, DOWN
        model.model.embed_tokens.weight[ANSWER_CUE, 1] = 3.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[BRIDGE, 0] = 1.0
        model.lm_head.weight[ANSWER, 1] = 1.0
        o_proj = model.model.layers[1].self_attn.o_proj.weight
        o_proj[1, 0] = 1.0  # the second hop: the moved bridge feature also lands on the answer feature
        if not mover:
            o_proj.zero_()
    return model


def rms(x: list) -> float:
    return math.sqrt(sum(v * v for v in x) / len(x) + EPS)


def lens_recall(x: list) -> float:
    """By hand: log softmax of the unembedding of norm(x) at B, which reads dimension 0 (A reads 1; 10 zero logits)."""
    bridge, answer = x[0] / rms(x), x[1] / rms(x)
    return bridge - math.log(math.exp(bridge) + math.exp(answer) + VOCAB - 2)


def planted_recall() -> list:
    """ENTREC at E1 of the two-hop prompt per state 0..3, from the construction."""
    one_hot = lambda d: [1.0 if i == d else 0.0 for i in range(HIDDEN)]  # noqa: E731
    state0 = one_hot(2 + E1 % (HIDDEN - 2))  # E1's own direction (dimension 8)
    n = 1 / rms(state0)  # E1's normalised value along dimension 8
    silu = lambda g: g / (1 + math.exp(-g))  # noqa: E731
    state1 = [v + (DOWN * silu(GATE * n) * UP * n if i == 0 else 0.0) for i, v in enumerate(state0)]
    before = [one_hot(2 + t % (HIDDEN - 2)) for t in TWO_HOP[:2]]  # BOS and the relation token, unchanged
    mean = [sum(x[i] / rms(x) for x in before + [state1]) / 3 for i in range(HIDDEN)]  # the mover's uniform read
    state2 = [a + b + (mean[0] if i == 1 else 0.0) for i, (a, b) in enumerate(zip(state1, mean))]
    return [-math.log(VOCAB), lens_recall(state1), lens_recall(state2), lens_recall(state2)]


def planted_item(name="q", e1_swap=True, r1_swap=True) -> Item:
    swap = lambda old, new: [new if t == old else t for t in TWO_HOP]  # noqa: E731
    return Item(name, Prompt(TWO_HOP, 2), ONE_HOP, BRIDGE,
                {"e1": Prompt(swap(E1, E1_CORRUPT), 2) if e1_swap else None,
                 "r1": Prompt(swap(RELATION, OTHER_RELATION), 2) if r1_swap else None})


def curve(summary: dict, measure: str) -> list:
    return [entry["frequency"] for entry in summary["curves"][measure]]


class PlantedRecallTest(unittest.TestCase):
    def test_entity_recall_per_state_is_what_the_construction_gives(self):
        model = recall_model()
        rows = entity_recall.chunk_rows(model, [planted_item("a"), planted_item("b", r1_swap=False)], PAD)
        self.assertEqual(len(rows), 2 * 4)
        expected = planted_recall()
        self.assertGreater(expected[1], expected[0] + 1)  # the planted first hop raises the recall
        for row in rows:
            self.assertAlmostEqual(row["entrec"], expected[row["state"]], places=4)
            self.assertAlmostEqual(row["entrec_e1"], -math.log(VOCAB), places=5)
        summary = entity_recall.summarise(rows)
        self.assertEqual(curve(summary, "first_hop_e1"), [None, 1.0, 1.0, 1.0])  # state 0 is a tie: not counted
        self.assertEqual(summary["ties"]["e1"], [2, 0, 0, 0])
        # The relation token precedes E1: it reaches the mention end only through the mover (state 2 on).
        self.assertEqual(summary["ties"]["r1"], [1, 1, 0, 0])
        self.assertEqual([e["n"] for e in summary["curves"]["first_hop_r1"]], [0, 0, 1, 1])
        self.assertEqual(curve(summary, "first_hop_r1"), [None, None, 1.0, 1.0])  # token 11 shares BOS's direction
        # Second hop: the mover (decoder layer 2) reads states 0 and 1 at E1; nothing reads state 2 there.
        self.assertEqual(curve(summary, "second_hop"), [1.0, 1.0, 0.0, None])
        self.assertEqual([r["derivative"] for r in rows if r["state"] == 2], [0.0, 0.0])
        self.assertEqual(curve(summary, "traversal_e1"), [None, 1.0, 0.0, None])
        self.assertEqual(summary["median_abs_cosine"][2], 0.0)
        self.assertGreater(summary["median_abs_cosine"][1], 1e-3)
        self.assertEqual((summary["best"]["second_hop"]["state"], summary["best"]["second_hop"]["frequency"]), (1, 1.0))

    def test_a_metric_whose_gradient_is_identically_zero_is_refused(self):
        def kl_with_itself(logits, _one_hop):
            log_p = logits.log_softmax(-1)
            return (log_p.exp() * (log_p - log_p)).sum(-1)

        cases = {"a divergence of the output with itself": (recall_model(), kl_with_itself),
                 "a score of detached logits": (recall_model(), lambda logits, one: entity_recall.consistency(
                     logits.detach(), one)),
                 "a model that never reads the mention end": (recall_model(mover=False), None)}
        for name, (model, metric) in cases.items():
            with self.subTest(name), self.assertRaises(UserError) as caught:
                entity_recall.chunk_rows(model, [planted_item()], PAD, metric)
            self.assertNotIn("\n", str(caught.exception))
            self.assertIn("identically zero", str(caught.exception))
        self.assertTrue(entity_recall.chunk_rows(recall_model(), [planted_item()], PAD))  # the real score passes


class CentralDifferenceTest(unittest.TestCase):
    """d CnstScore / d alpha from one backward pass against a float64 central difference on a random model:
    GPT-2, whose LayerNorm computes in the input's dtype (Llama's RMSNorm computes in float32, which leaves
    a float64 model's finite differences with float32 noise)."""

    def test_the_entity_recall_derivative_matches_a_float64_central_difference(self):
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=3, n_head=2, n_positions=32, pad_token_id=PAD,
                            bos_token_id=BOS, eos_token_id=11)
        model = GPT2LMHeadModel(config).double().eval()
        items = [planted_item("a"), Item("b", Prompt([BOS, 3, E1, 7, 4, 10, 5], 3), [BOS, 6, 8], 4, {"e1": None,
                                                                                                  "r1": None})]
        rows = entity_recall.chunk_rows(model, items, PAD)  # one batch: "a" is left-padded
        h = 1e-5
        for item in items:
            batch = Batch.left_padded([item.prompt.ids], PAD)
            cell = batch.cells([item.prompt.end])
            with torch.no_grad(), read_states(model) as states:
                one_hop = model(torch.tensor([item.one_hop])).logits[:, -1]
                model(**batch.inputs())

            def score(state, added):
                with torch.no_grad(), add_to_states(model, {state: (*cell, added)}, batch):
                    return entity_recall.consistency(model(**batch.inputs()).logits[:, -1], one_hop).item()

            for state in range(3):
                x = states[state][cell].clone().requires_grad_()
                recall = model.lm_head(model.transformer.ln_f(x)).log_softmax(-1)[0, item.bridge]
                direction = torch.autograd.grad(recall, x)[0]
                numeric = (score(state, h * direction) - score(state, -h * direction)) / (2 * h)
                analytic = next(r["derivative"] for r in rows if r["item"] == item.id and r["state"] == state)
                with self.subTest(item=item.id, state=state):
                    self.assertGreater(abs(numeric), 1e-6)
                    self.assertLess(abs(analytic - numeric) / abs(numeric), 1e-3)


class ItemsTest(unittest.TestCase):
    """Items from dataset rows: where the mention ends, the substitutions, the one-hop question."""

    @classmethod
    def setUpClass(cls):
        cls.tokenizer = train_tokenizer(vocabulary_corpus(), 4096)

    @staticmethod
    def row(e1, e2, question, prefix, e3="Oslo"):
        return {"messages": [{"role": "system", "content": "Answer directly."}, {"role": "user", "content": question},
                             {"role": "assistant", "content": e3}], "question": question, "answer": e3,
                "answer_intermediate": e2, "auxiliary_loss_prefix": prefix, "e1": e1}

    def test_the_mention_ends_at_e1_or_at_the_relation_word_after_it(self):
        rows = [self.row("Ada Hughes-Marsjanska", "Bo Lind-Ahl",
                         "In which city was the spouse of Ada Hughes-Marsjanska born?",
                         "In which city was the spouse of Ada Hughes-Marsjanska"),
                self.row("Cy Moss-Reed", "Dee Park-Lowe", "Where was Cy Moss-Reed's spouse born?",
                         "Where was Cy Moss-Reed's spouse"),
                self.row("Eve Stone-Hale", "Bo Fenn-Ward", "Where was Eve Stone-Hale's spouse born?",
                         "Where was Eve Stone-Hale's spouse")]
        one_hop = {"test/b": [{"messages": [{"role": "user", "content": f"Where was {e2} born?"},
                                            {"role": "assistant", "content": "Oslo"}],
                               "question": f"Where was {e2} born?", "e2": e2}
                              for e2 in ("Bo Lind-Ahl", "Dee Park-Lowe")]}
        items, skipped = entity_recall.build_items(self.tokenizer, {"test/2hop": rows}, one_hop,
                                                   {"spouse": "architect"})
        self.assertEqual([i.id for i in items], ["test/2hop:0", "test/2hop:1"])
        self.assertEqual(skipped, {"no_one_hop": 1, "no_e1_partner": 0, "no_relation_swap": 0})
        decode = lambda prompt: self.tokenizer.decode(prompt.ids[:prompt.end + 1])  # noqa: E731
        self.assertTrue(decode(items[0].prompt).endswith("the spouse of Ada Hughes-Marsjanska"))
        self.assertTrue(decode(items[1].prompt).endswith("Cy Moss-Reed's spouse"))
        self.assertEqual(items[1].info["mention_end"].strip(), "spouse")
        self.assertTrue(decode(items[1].substituted["r1"]).endswith("Cy Moss-Reed's architect"))
        self.assertTrue(decode(items[0].substituted["r1"]).endswith("the architect of Ada Hughes-Marsjanska"))
        # Ada's bridge starts as Eve's does ("Bo"), so only Cy substitutes Ada; Eve (skipped) may substitute Cy.
        self.assertTrue(decode(items[0].substituted["e1"]).endswith("the spouse of Cy Moss-Reed"))
        for seed in range(1, 6):
            again, _ = entity_recall.build_items(self.tokenizer, {"test/2hop": rows}, one_hop, {}, seed=seed)
            self.assertEqual(again[0].info["e1_substitute"], "Cy Moss-Reed")
            self.assertIsNone(again[0].substituted["r1"])  # no swap given
        partner = items[1].info["e1_substitute"]
        self.assertIn(partner, ("Ada Hughes-Marsjanska", "Eve Stone-Hale"))
        self.assertTrue(decode(items[1].substituted["e1"]).endswith(f"{partner}'s spouse"))
        self.assertEqual(self.tokenizer.decode(items[1].one_hop).count("Dee Park-Lowe"), 1)
        with self.assertRaisesRegex(UserError, "auxiliary_loss_prefix"):
            entity_recall.build_items(self.tokenizer, {"t": [dict(rows[0], auxiliary_loss_prefix="")]}, one_hop, {})


class EntrecJobTest(unittest.TestCase):
    """The sub-job through the real runner, on the untrained tiny model (--model as it is)."""

    def test_entrec_writes_the_house_outputs(self):
        with tempfile.TemporaryDirectory() as tmp:
            w = Path(tmp) / "w"
            code = main(["--workspace_path", str(w), "--jobs", "intervene_entrec", "--set", "model_from=cli",
                         "--set", "max_items=6"])
            self.assertEqual(code, 0)
            run = w / "experiments" / "intervene" / "entrec" / "tiny-h128-l2" / "seed_1"
            for name in ("rows.jsonl", "results.json", "summary.md", "entrec.png"):
                self.assertTrue((run / name).is_file(), name)
            rows = [json.loads(line) for line in (run / "rows.jsonl").read_text().splitlines()]
            self.assertEqual(len(rows), 6 * 3)  # 6 questions x states 0..2
            results = json.loads((run / "results.json").read_text())
            self.assertEqual(results["summary"]["n"], 6)
            self.assertEqual(max(results["parity"].values()), 0.0)
            self.assertEqual([e["n"] for e in results["summary"]["curves"]["second_hop"]], [6, 6, 0])
            self.assertTrue(all(r["derivative"] != 0 for r in rows if r["state"] < 2))
            self.assertIn("second hop", (run / "summary.md").read_text())


if __name__ == "__main__":
    unittest.main()
