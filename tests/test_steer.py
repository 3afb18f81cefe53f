"""Steering on planted models whose answers are known exactly, and the steer sub-job through the runner.

- An identity model (every decoder layer's output equals its input): the difference of means at t2
  between prompts ending in token a and prompts ending in token b is exactly E[a] - E[b] at every state.
- A random model: ablating a direction leaves the state's projection on it 0 (float error), amplifying
  multiplies it, and the orthogonal part is untouched.
- A "successor" model (identity layers; the unembedding maps token t's direction to t + 1, so a prompt
  ending in 5 is answered 6 7 8): adding 3 x E[2] at the last position makes the first reply token 3;
  on the prompt pass only the reply then runs on (3 4 5), on every generated token it stays (3 3 3).
  lm-eval's last-token hooks give the same replies as our padding-aware cells.
"""
import json
import statistics
import tempfile
import unittest
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from runner.errors import UserError
from runner.jobs.intervene import JOB
from runner.main import main
from twohop.evaluation import generation
from twohop.interp import steering
from twohop.interp.backpatching import Query
from twohop.interp.directions import load_directions, save_directions
from twohop.interp.hooks import Batch, final_logits, read_states

PAD, BOS, EOS, VOCAB, HIDDEN = 0, 1, 11, 12, 12


class StubTokenizer:
    """What steering asks of a tokenizer: a reply is its token ids."""
    pad_token_id, eos_token_id = PAD, EOS

    @staticmethod
    def batch_decode(tokens, skip_special_tokens=True):
        return [" ".join(str(t) for t in row.tolist() if t != PAD) for row in tokens]


def identity_model(layers: int = 2, seed: int = None) -> LlamaForCausalLM:
    """A Llama whose decoder layers add nothing (attention and MLP outputs are zero): every state equals
    the embeddings. Embeddings are one-hot (token t on dimension t) or, with `seed`, random."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=HIDDEN // 2, tie_word_embeddings=False,
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, max_position_embeddings=32)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings = model.model.embed_tokens.weight
        if seed is None:
            embeddings.copy_(torch.eye(VOCAB, HIDDEN))
        else:
            embeddings.copy_(torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(seed)))
    return model


def successor_model() -> LlamaForCausalLM:
    """Identity layers; the unembedding reads token t's dimension as token t + 1 (t = 2..9)."""
    model = identity_model(layers=2)
    with torch.no_grad():
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        for token in range(2, 10):
            model.lm_head.weight[token + 1, token] = 1.0
    return model


def query(name: str, ids: list) -> Query:
    return Query(name, ids, {"t1": 1, "t2": len(ids) - 1}, {"e1": name, "answer": "3"})


class DirectionTest(unittest.TestCase):
    def test_difference_of_means_on_an_identity_model_is_the_embedding_difference(self):
        model, a, b = identity_model(seed=0), 7, 9
        ending_a = [query("a1", [BOS, 2, 3, a]), query("a2", [BOS, a])]
        ending_b = [query("b1", [BOS, 4, b]), query("b2", [BOS, 2, 3, 4, 5, b]), query("b3", [BOS, 6, b])]
        directions = steering.difference_of_means((model, ending_a), (model, ending_b), "t2", PAD, batch_size=2)
        embeddings = model.model.embed_tokens.weight.double()
        self.assertEqual(sorted(directions), [0, 1, 2])
        for state, direction in directions.items():
            self.assertEqual(direction.dtype, torch.float64)
            torch.testing.assert_close(direction, embeddings[a] - embeddings[b], atol=1e-12, rtol=0)
        at_t1 = steering.difference_of_means((model, ending_a), (model, ending_b), "t1", PAD, batch_size=2)
        expected = (embeddings[2] + embeddings[a]) / 2 - (embeddings[4] + embeddings[2] + embeddings[6]) / 3
        torch.testing.assert_close(at_t1[1], expected, atol=1e-12, rtol=0)

    def test_a_zero_direction_is_skipped_and_add_scales_the_direction_or_the_state_norm(self):
        direction = torch.tensor([3.0, 4.0], dtype=torch.float64)
        directions, norms = {0: torch.zeros(2, dtype=torch.float64), 1: direction}, {0: 1.0, 1: 10.0}
        found, skipped = steering.steers(directions, norms, "t2", "add", [2.0], "direction", False)
        self.assertEqual((skipped, [s.state for s in found]), ([0], [1]))
        torch.testing.assert_close(found[0].vector, torch.tensor([6.0, 8.0]))
        found, _ = steering.steers(directions, norms, "t2", "add", [2.0], "state_norm", False)
        torch.testing.assert_close(found[0].vector, torch.tensor([12.0, 16.0]))  # 2 x 10 x the unit direction
        found, _ = steering.steers(directions, norms, "t2", "ablate", [0.0], "direction", True)
        torch.testing.assert_close(found[0].vector, torch.tensor([0.6, 0.8]))
        self.assertEqual((found[0].scale, found[0].every_token), (0.0, True))

    def test_a_probes_directions_file_is_read_for_its_position_only(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "directions.safetensors"
            vectors = {s: torch.arange(HIDDEN, dtype=torch.float32) + s for s in range(3)}
            save_directions(path, vectors, "probe", "t2", "correct - wrong")
            found = steering.read_directions(path, "t2", [1, 2], HIDDEN)
            self.assertEqual(sorted(found), [1, 2])
            torch.testing.assert_close(found[2], vectors[2].double())
            for position, states, width, message in (("t1", [0], HIDDEN, "read at t2"), ("t2", [3], HIDDEN, "no direction"),
                                                     ("t2", [0], 8, "width")):
                with self.assertRaisesRegex(UserError, message) as caught:
                    steering.read_directions(path, position, states, width)
                self.assertNotIn("\n", str(caught.exception))


class InterventionTest(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, head_dim=8, pad_token_id=PAD,
                             bos_token_id=BOS, eos_token_id=EOS, max_position_embeddings=32)
        self.model = LlamaForCausalLM(config).eval()
        self.prompts = [query("a", [BOS, 2, 3, 4]), query("b", [BOS, 5, 6])]
        self.batch = Batch.left_padded([p.ids for p in self.prompts], PAD)
        with read_states(self.model) as states:
            final_logits(self.model, self.batch)
        self.clean = states
        self.unit = self.direction(1)

    def direction(self, state: int) -> torch.Tensor:
        """A unit direction both prompts' t2 states have a large component along."""
        last = self.clean[state][:, -1]
        return torch.nn.functional.normalize(last.mean(0) + 0.1 * last.norm(dim=-1).mean() * torch.randn(16), dim=0)

    def test_ablation_makes_the_projection_zero_and_amplify_scales_it(self):
        rows, columns = self.batch.cells([p.positions["t2"] for p in self.prompts])
        for state, mode, factor in ((0, "ablate", 0.0), (1, "ablate", 0.0), (2, "ablate", 0.0), (1, "amplify", 3.0),
                                    (2, "amplify", -1.0)):
            unit, clean = self.direction(state), self.clean[state]
            with read_states(self.model) as read, steering.Steer(mode, "t2", state, factor, unit).on(
                    self.model, self.batch, self.prompts):
                final_logits(self.model, self.batch)
            steered = read[state]  # read entered first: it sees the edited state
            before, after = clean[rows, columns] @ unit, steered[rows, columns] @ unit
            self.assertTrue((before.abs() > 0.1 * clean[rows, columns].norm(dim=-1)).all(), before)
            torch.testing.assert_close(after, factor * before, atol=1e-5, rtol=1e-5)
            orthogonal = lambda h: h - (h @ unit)[..., None] * unit  # noqa: E731
            torch.testing.assert_close(orthogonal(steered[rows, columns]), orthogonal(clean[rows, columns]),
                                       atol=1e-5, rtol=1e-5)
            untouched = torch.ones_like(clean[..., 0], dtype=torch.bool)
            untouched[rows, columns] = False
            torch.testing.assert_close(steered[untouched], clean[untouched], atol=0, rtol=0)

    def test_every_token_ablation_also_reaches_the_decoding_steps(self):
        for every_token, expected_zero in ((True, True), (False, False)):
            steer = steering.Steer("ablate", "t2", 1, 0.0, self.unit, every_token)
            with read_states(self.model) as last, steer.on(self.model, self.batch, self.prompts):
                generation.greedy(self.model, StubTokenizer, self.batch.input_ids, self.batch.attention_mask, 3)
            projection = last[1][:, -1] @ self.unit  # the last decoding step
            self.assertEqual(bool((projection.abs() < 1e-5).all()), expected_zero, projection)


class PlantedSteeringTest(unittest.TestCase):
    def setUp(self):
        self.model = successor_model()
        self.prompts = [query("long", [BOS, 3, 5]), query("longer", [BOS, 2, 4, 5]), query("short", [BOS, 4])]
        self.push = 3.0 * torch.eye(HIDDEN)[2]  # towards token 2's direction, read as "3 comes next"

    def replies(self, steer=None) -> list:
        return steering.replies(self.model, StubTokenizer, self.prompts, 8, 3, steer)

    def test_steering_the_prompt_pass_flips_the_first_token_and_every_token_keeps_it_flipped(self):
        self.assertEqual(self.replies(), ["6 7 8", "6 7 8", "5 6 7"])
        for state in (0, 1, 2):
            prompt_only = steering.Steer("add", "t2", state, 1.0, self.push)
            every = steering.Steer("add", "t2", state, 1.0, self.push, every_token=True)
            self.assertEqual(self.replies(prompt_only), ["3 4 5"] * 3, state)
            self.assertEqual(self.replies(every), ["3 3 3"] * 3, state)
        at_t1 = steering.Steer("add", "t1", 1, 1.0, self.push)  # t1 = index 1, not the last token: no change
        self.assertEqual(self.replies(at_t1)[:2], ["6 7 8", "6 7 8"])

    def test_lm_evals_last_token_hooks_match_our_cells(self):
        batch = Batch.left_padded([p.ids for p in self.prompts], PAD)
        for every_token in (False, True):
            steer = steering.Steer("add", "t2", 1, 1.0, self.push, every_token)
            with steer.at_last_token(self.model):
                tokens = generation.greedy(self.model, StubTokenizer, batch.input_ids, batch.attention_mask, 3)
            self.assertEqual(StubTokenizer.batch_decode(tokens), self.replies(steer))


class SummaryTest(unittest.TestCase):
    def rows(self, state, correct, unsteered):
        return [{"set": "two_hop", "item": str(i), "position": "t2", "state": state, "scale": 1.0, "reply": "x",
                 "correct": c, "unsteered_correct": u} for i, (c, u) in enumerate(zip(correct, unsteered))]

    def test_the_effect_is_paired_and_a_killed_run_keeps_complete_interventions_only(self):
        rows = self.rows(1, [1, 1, 0, 1], [0, 1, 0, 0]) + self.rows(2, [0, 0], [0, 1])
        self.assertEqual(len(steering.complete(rows, {"t2": 4})), 4)
        unsteered = {"two_hop": [(str(i), "x", bool(u), {}) for i, u in enumerate([0, 1, 0, 0])]}
        summary = steering.summarise(rows[:4], unsteered)
        entry = summary["grid"][0]["effects"]["two_hop"]
        self.assertEqual((entry["effect"], entry["steered"], entry["unsteered"], entry["top_reply_share"]),
                         (0.5, 0.75, 0.25, 1.0))
        self.assertAlmostEqual(entry["se"], statistics.stdev([1, 0, 0, 1]) / 2)  # paired differences over 4 items
        self.assertEqual(summary["baseline"]["two_hop"]["accuracy"], 0.25)


class SteerJobTest(unittest.TestCase):
    """The sub-job through the real runner, on the untrained tiny model (--model as it is)."""

    def test_steer_writes_the_house_outputs_with_lm_eval_under_the_hooks(self):
        with tempfile.TemporaryDirectory() as tmp:
            w = Path(tmp) / "w"
            code = main(["--workspace_path", str(w), "--jobs", "intervene_steer", "--set", "model_from=cli",
                         "--set", "max_items=8", "--set", "contrast=cot_nocot", "--set", "states=[2]",
                         "--set", "scales=[2]", "--set", "max_new_tokens=3", "--set", "when=every_token",
                         "--set", "positions=[t2,t1]", "--set", "lm_eval_tasks=[twohop_spouses_test_2hop_nocot]",
                         "--set", "lm_eval_limit=2"])
            self.assertEqual(code, 0)
            run = w / "experiments" / "intervene" / "steer" / "tiny-h128-l2" / "seed_1"
            for name in ("rows.jsonl", "results.json", "summary.md", "steering.png", "directions.safetensors",
                         "directions_t1.safetensors"):
                self.assertTrue((run / name).is_file(), name)
            directions, metadata = load_directions(run / "directions.safetensors")
            self.assertEqual((sorted(directions), metadata["position"], metadata["kind"]),
                             ([2], "t2", "difference_of_means"))
            results = json.loads((run / "results.json").read_text())
            graded = results["summary"]["baseline"]
            self.assertEqual(graded["two_hop"]["n"], 4)  # half of the 8 people
            self.assertEqual(graded["lm_eval:twohop_spouses_test_2hop_nocot"]["n"], 2)
            rows = [json.loads(line) for line in (run / "rows.jsonl").read_text().splitlines()]
            per_t2 = 4 + graded["hop_a"]["n"] + graded["hop_b"]["n"] + 2  # lm-eval at t2 only
            self.assertEqual(len(rows), per_t2 + (per_t2 - 2))
            self.assertEqual({r["every_token"] for r in rows}, {True})
            self.assertEqual(max(results["parity"]["model"].values()), 0.0)
            self.assertIn("| t1 | 2 | 2 |", (run / "summary.md").read_text())

    def test_probe_directions_make_the_probe_of_the_same_setting_a_prerequisite(self):
        subjobs = {s.full_name: s for s in JOB.subjobs}
        for name, probe in (("intervene_steer", "intervene_probe"), ("intervene_steer_samedoc", "intervene_probe_samedoc"),
                            ("intervene_steer_universities", "intervene_probe_universities")):
            config = {**subjobs[name].default_config(None), "directions_from": "probe"}
            self.assertIn((probe, None), subjobs[name].requirements(config))
            self.assertNotIn((probe, None), subjobs[name].requirements())
        base = {**subjobs["intervene_steer"].default_config(None), "contrast": "finetuned_base"}
        self.assertIn(("finetune_base", None), subjobs["intervene_steer"].requirements(base))


if __name__ == "__main__":
    unittest.main()
