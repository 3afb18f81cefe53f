"""Circuit discovery on planted mechanisms, whose answers are known exactly, and on tiny random models.

The planted model (`mover_model`) is a 2-layer Llama with 2 heads per layer whose every weight is zero
except for one head, decoder layer 2's head 0 (the "mover"): its attention has q = k = 0 (uniform causal
attention) and its value and output maps copy the first half of the residual, so the last position
receives the mean of the normalised states before it, among them the clean name's "answer feature"
(dimension 0) that only the answer token reads. The corrupting name carries none, and the foil reads a
dimension nothing writes: the logit difference is exactly 0 on the corrupted prompt and on any run where
the mover writes its mean over the corrupted prompts.
"""
import tempfile
import unittest
from pathlib import Path

import torch
from tests.fixtures.planted import blank_llama
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from twohop import stats
from twohop.data.records import read_records
from twohop.interp import circuits, contrasts, edges, patching
from twohop.interp.circuits import Component
from twohop.interp.hooks import Batch

PAD, BOS, E1, E1_CORRUPT, ANSWER, FOIL = 0, 1, 6, 7, 8, 9
HIDDEN, HEADS = 12, 2
CLEAN = [BOS, 2, E1, 3, 4, 5]
MOVER = Component(2, 0)


def llama(layers=2, heads=HEADS, kv_heads=HEADS, hidden=HIDDEN, vocab=12, seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                         tie_word_embeddings=False, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=vocab - 1,
                         max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


def mover_model() -> LlamaForCausalLM:
    model, half = blank_llama(llama().config), HIDDEN // HEADS
    with torch.no_grad():
        embeddings = model.model.embed_tokens.weight
        for token in range(12):
            embeddings[token, 2 + token % (HIDDEN - 2)] = 1.0
        embeddings[E1, 0] = 2.0  # the clean name's answer feature
        model.lm_head.weight[ANSWER, 0] = 1.0
        model.lm_head.weight[FOIL, 1] = 1.0
        attention = model.model.layers[MOVER.layer - 1].self_attn
        attention.v_proj.weight[:half, :half] = torch.eye(half)  # head 0's value: the first half of the residual
        attention.o_proj.weight[:half, :half] = torch.eye(half)
    return model


def items(clean_rows, swap: dict, answer=ANSWER, foil=FOIL) -> list:
    return [patching.Item(f"q{i}", row, [swap.get(t, t) for t in row], {}, answer, foil)
            for i, row in enumerate(clean_rows)]


def planted_items() -> list:
    return items([CLEAN, [BOS, E1, 3, 5], [BOS, 4, 2, E1, 2, 3, 5]], {E1: E1_CORRUPT})


def random_items(seed=0, count=6, vocab=40) -> list:
    generator = torch.Generator().manual_seed(seed)
    rows = [[BOS] + torch.randint(4, vocab, (5 + i % 3,), generator=generator).tolist() for i in range(count)]
    return items([r[:2] + [2] + r[2:] for r in rows], {2: 3}, answer=10, foil=11)


class PlantedMoverTest(unittest.TestCase):
    def setUp(self):
        self.model, self.items = mover_model(), planted_items()
        self.scored = circuits.score(self.model, self.items, PAD, batch_size=2, exact_top=0)

    def test_attribution_and_exact_patching_single_out_the_mover(self):
        self.assertEqual(self.scored["ranking"][0], MOVER)
        self.assertEqual(max(self.scored["corrupted"]), 0.0)
        for method in ("attribution", "exact"):
            scores = self.scored[method]
            self.assertGreater(scores[MOVER], 0.1, method)
            self.assertEqual({c: v for c, v in scores.items() if c != MOVER and v != 0}, {}, method)
        clean_mean = sum(self.scored["clean"]) / len(self.items)
        self.assertAlmostEqual(self.scored["exact"][MOVER], clean_mean, places=5)  # patching it recovers all

    def test_the_mover_alone_is_faithful_and_necessary(self):
        found = circuits.faithfulness(self.model, self.items, PAD, 2, self.scored, top_k=1,
                                      also_ablate={"other heads": [Component(1, 0), Component(2, 1)]})
        by_k = {point["k"]: point for point in found["curve"]}
        self.assertAlmostEqual(by_k[1]["faithfulness"], 1.0, places=5)
        self.assertAlmostEqual(by_k[0]["faithfulness"], 0.0, places=5)
        self.assertEqual(found["accuracy"], {"none": 1.0, "top_1": 0.5, "other heads": 1.0})  # 0.5: chance
        self.assertEqual(found["corrupted_accuracy"], 0.5)


class RandomModelTest(unittest.TestCase):
    def test_attribution_agrees_with_exact_patching_in_rank(self):
        model = llama(layers=2, heads=4, kv_heads=4, hidden=32, vocab=40, seed=1)
        scored = circuits.score(model, random_items(), PAD, batch_size=3, exact_top=0)
        heads = [c for c in circuits.components(model) if c.head >= 0]
        rho = stats.spearman([scored["attribution"][c] for c in heads], [scored["exact"][c] for c in heads])
        self.assertGreaterEqual(rho, 0.9)

    def test_attribution_is_exact_where_the_downstream_map_is_linear(self):
        model = llama(layers=2, heads=4, kv_heads=2, hidden=32, vocab=40, seed=2)  # grouped-query attention
        model.model.norm = torch.nn.Identity()
        with torch.no_grad():
            model.model.layers[-1].mlp.down_proj.weight.zero_()  # last heads -> o_proj -> residual -> unembedding
        scored = circuits.score(model, random_items(seed=3), PAD, batch_size=6, exact_top=0)
        for head in range(4):
            component = Component(2, head)
            self.assertAlmostEqual(scored["attribution"][component], scored["exact"][component], places=4)

    def test_hooks_that_do_nothing_leave_logits_unchanged(self):
        gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=32, n_embd=16, n_layer=2, n_head=4,
                                    bos_token_id=BOS, eos_token_id=39)).eval()
        for model in (llama(heads=4, kv_heads=1, hidden=16, vocab=40), gpt2):
            batch = Batch.left_padded([r.clean for r in random_items()], PAD)
            self.assertLess(circuits.parity_check(model, batch), 1e-5)
            scored = circuits.score(model, random_items(), PAD, batch_size=6, exact_top=3)
            self.assertEqual(len(scored["exact"]), 3)
            self.assertEqual(len(scored["attribution"]), 2 * 4 + 2)
            # embeddings -> all 5 receivers; a layer-1 head -> L1.mlp, L2.attn, L2.mlp, logits; L1.MLP -> the 3
            # after it; a layer-2 head -> L2.mlp, logits; L2.MLP -> logits
            self.assertEqual(len(edges.edge_scores(model, random_items(), PAD, 6)), 5 + 4 * 4 + 3 + 4 * 2 + 1)


if __name__ == "__main__":
    unittest.main()



class EdgeAttributionTest(unittest.TestCase):
    def test_the_planted_path_embeddings_to_mover_to_logits_carries_the_edges(self):
        scores = edges.edge_scores(mover_model(), planted_items(), PAD, batch_size=3)
        carrying = {edge for edge, value in scores.items() if value != 0}
        self.assertEqual(carrying, {("embeddings", "L2.attn"), ("L2.H0", "logits")})
        self.assertGreater(min(scores[edge] for edge in carrying), 0.1)
        self.assertNotIn(("L2.H0", "L1.attn"), scores)  # a later component writes nothing an earlier one reads

    def test_edges_into_a_linear_readout_are_exact(self):
        model = llama(layers=2, heads=4, kv_heads=2, hidden=32, vocab=40, seed=2)
        model.model.norm = torch.nn.Identity()
        with torch.no_grad():
            model.model.layers[-1].mlp.down_proj.weight.zero_()
        found = random_items(seed=3)
        scores = edges.edge_scores(model, found, PAD, batch_size=6)
        exact = circuits.score(model, found, PAD, batch_size=6, exact_top=0)["exact"]
        for head in range(4):
            self.assertAlmostEqual(scores[(f"L2.H{head}", "logits")], exact[Component(2, head)], places=4)

class ContrastsTest(unittest.TestCase):
    """Clean/corrupted pairs from the data the sub-jobs read: IOI test rows generated for a GPT-2-style
    tokenizer (no chat template), and CoT two-hop rows rendered with the tiny tokenizer's template."""

    @classmethod
    def setUpClass(cls):
        from models import load_tokenizer
        from models.tiny import train_tokenizer, vocabulary_corpus
        from tests.test_ioi import generate, gpt2_style
        from twohop.data import tables
        cls.tmp = tempfile.TemporaryDirectory()
        root = Path(cls.tmp.name)
        cls.gpt2_path = gpt2_style(root / "gpt2-style", tables.names()[0][::3])
        cls.ioi_data = generate(cls.gpt2_path, root / "ioi", train_per_family=4, test_per_family=6)
        train_tokenizer(vocabulary_corpus(), 4096).save_pretrained(root / "tiny")
        cls.tiny = load_tokenizer(root / "tiny")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_ioi_rows_give_aligned_pairs_and_a_discovery(self):
        from models import load_model
        model, tokenizer = load_model(self.gpt2_path)
        found, skipped = contrasts.ioi_items(tokenizer, read_records(self.ioi_data / "test" / "3obj.jsonl"))
        self.assertEqual((len(found), skipped), (6, 0))
        for item in found:
            self.assertEqual(len(item.clean), len(item.corrupted))
            self.assertEqual(item.clean[0], tokenizer.bos_token_id)
            self.assertEqual(tokenizer.decode([item.answer]).strip(), item.info["answer"])
            self.assertEqual(tokenizer.decode([item.foil]).strip(), item.info["foil"])
        result = circuits.discover(model, found, tokenizer.eos_token_id, 3, top_k=2, exact_top=4)
        self.assertEqual(len(result["attribution"]), 2 * 4 + 2)
        self.assertEqual(len(result["top"]), 2)

    def test_cot_items_stop_before_the_bridge_and_swap_e1_in_the_chain_too(self):
        people = [("Ulla Hughes", "Rania Ortiz", "Turin"), ("Abel Hughes", "Calla Ortiz", "Porto")]
        rows = [{"messages": [{"role": "user", "content": f"Where was the spouse of {e1} born?"},
                              {"role": "assistant", "content": f"{e1}'s spouse is {e2}. {e2} was born in {e3}."}],
                 "question": f"Where was the spouse of {e1} born?", "answer": e3, "e1": e1, "e2": e2, "e3": e3}
                for e1, e2, e3 in people]
        found, skipped = patching.pair_items(self.tiny, {"test": rows}, make=contrasts.chain_item)
        self.assertEqual((len(found), skipped), (2, 0))
        clean, corrupted = self.tiny.decode(found[0].clean), self.tiny.decode(found[0].corrupted)
        self.assertTrue(clean.endswith("Ulla Hughes's spouse is"), clean)
        self.assertTrue(corrupted.endswith("Abel Hughes's spouse is"), corrupted)
        self.assertNotIn("Ulla", corrupted)
        self.assertEqual(self.tiny.decode([found[0].answer]).strip(), "Rania")
        self.assertEqual(self.tiny.decode([found[0].foil]).strip(), "Calla")


    def test_in_context_items_ask_about_a_distractor_of_the_same_prompt(self):
        facts = ("Ulla Hughes's spouse is Rania Ortiz.\nAbel Hughes's spouse is Calla Ortiz.\nRania Ortiz was born in "
                 "Turin.\nCalla Ortiz was born in Porto.\n\nWhere was Ulla Hughes's spouse born?")
        row = {"messages": [{"role": "user", "content": facts}, {"role": "assistant", "content": "Turin"}],
               "question": facts, "answer": "Turin", "e1": "Ulla Hughes"}
        found, skipped = contrasts.in_context_items(self.tiny, {"test": [row]})
        self.assertEqual((len(found), skipped), (1, 0))
        corrupted = self.tiny.decode(found[0].corrupted)
        self.assertIn("Where was Abel Hughes's spouse born?", corrupted)
        self.assertIn("Ulla Hughes's spouse is Rania Ortiz.", corrupted)  # the facts stay as they were
        self.assertEqual(self.tiny.decode([found[0].foil]).strip(), "Porto")


class CircuitsRunnerTest(unittest.TestCase):
    def test_circuits_ioi_before_and_after_a_few_steps_of_finetune_on_a_gpt2_style_model(self):
        """circuits_ioi_3obj with compare_finetune: --model as it is (before) and after finetune_ioi_3obj (3 steps);
        every output written, one row per model, task and component."""
        import contextlib
        import io
        import json
        from runner.main import main
        from tests.fixtures.train_small import SMALL_WORLD
        from tests.test_ioi import gpt2_style
        from twohop.data import tables
        with tempfile.TemporaryDirectory() as tmp:
            w = Path(tmp)
            gpt2_style(w / "transformers" / "gpt2", tables.names()[0][::3])
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                sets = ["generate_data_ioi.train_per_family=20", "generate_data_ioi.test_per_family=6",
                        "finetune_ioi_3obj.max_steps=3", "finetune_ioi_3obj.eval_subsample=4",
                        "circuits_ioi_3obj.compare_finetune=true", "circuits_ioi_3obj.top_k=3"]
                code = main(["--workspace_path", str(w), "--model", "gpt2", "--jobs", "circuits_ioi_3obj", *SMALL_WORLD,
                             *[part for value in sets for part in ("--set", value)]])
            self.assertEqual(code, 0, err.getvalue()[-2000:])
            run = w / "experiments" / "circuits" / "ioi_3obj" / "gpt2" / "seed_1"
            for name in ("scores.jsonl", "edges.jsonl", "results.json", "summary.md", "heatmaps.png",
                         "faithfulness.png", "overlap.png"):
                self.assertTrue((run / name).is_file(), name)
            results = json.loads((run / "results.json").read_text())
            self.assertEqual(set(results["comparison"]), {"3obj", "2obj"})
            rows = [json.loads(line) for line in (run / "scores.jsonl").read_text().splitlines()]
            self.assertEqual(len(rows), 2 * 2 * (2 * 4 + 2))  # models x tasks x (heads + MLPs)
            self.assertIn("before's top 3 on 2obj", results["tasks"]["3obj"]["after"]["accuracy"])
            self.assertEqual(results["comparison"]["3obj"]["edges"]["top"], 6)
