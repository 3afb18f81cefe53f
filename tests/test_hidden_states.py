"""Hidden states: capture against the model's own outputs, shard/sidecar round trip in row order,
resume after a real kill, the reader's filters, and the analysis maths on hand-made cases."""
import json
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from models import ensure_model, load_model, resolve_model
from models.families import final_norm, unembedding
from twohop.evaluation import generation
from runner.errors import UserError
from twohop.interp.hidden_states import HiddenStates, row_states, save_hidden_states
from twohop import stats
from twohop.interp.similarity import cosine_matrix, pair_similarity, permutation_p, spearman

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["Oslo", "Lima", "Paris", "Rome", "Cork", "Kyoto", "Quito", "Turin"]


def make_rows(tokenizer, n: int) -> list:
    """Rows whose prompt lengths vary out of order, so length-sorted batching reorders them."""
    rows = []
    for i in range(n):
        city = WORDS[i % len(WORDS)]
        text = f"Tell me about {city}" + " and the sea" * ((7 * i) % 5) + "."
        rows.append({"id": i, "city": city, "span": city, "prompts": [generation.prompt_text(
            tokenizer, [{"role": "user", "content": text}])]})
    return rows


class HiddenStatesTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        ref = resolve_model("tiny", Path(cls.tmp.name) / "transformers")
        ensure_model(ref)
        cls.model_path = ref.path
        cls.model, cls.tokenizer = load_model(ref.path)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_capture_matches_the_models_hidden_states_and_logits(self):
        rows = make_rows(self.tokenizer, 3)
        states = row_states(self.model, self.tokenizer, rows, ["last"], batch_size=3)["last"]
        self.assertEqual(states.shape, (3, 3, 128))  # embeddings + 2 layers, 3 rows
        for r, row in enumerate(rows):
            ids = torch.tensor([self.tokenizer(row["prompts"][0], add_special_tokens=False)["input_ids"]])
            out = self.model(input_ids=ids, output_hidden_states=True)
            torch.testing.assert_close(states[0, r], out.hidden_states[0][0, -1], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(states[1, r], out.hidden_states[1][0, -1], atol=1e-5, rtol=1e-4)
            # The last layer is stored before the final norm: norm + unembedding give the model's logits.
            lens = unembedding(self.model)(final_norm(self.model)(states[2, r]))
            torch.testing.assert_close(lens, out.logits[0, -1], atol=1e-4, rtol=1e-4)

    def test_round_trip_keeps_row_order_and_averages_prompts(self):
        rows = make_rows(self.tokenizer, 23)
        rows[5]["prompts"] = rows[5]["prompts"] + rows[13]["prompts"]  # a row of two prompts (same city): their mean
        out = Path(self.tmp.name) / "round_trip"
        info = save_hidden_states(self.model, self.tokenizer, rows, out, ("last", "span"), batch_size=4, shard_rows=7)
        self.assertEqual((info["shards"], info["layers"], info["rows"]), (4, 3, 23))
        states = HiddenStates(out)
        self.assertEqual([r["id"] for r in states.rows], list(range(23)))
        self.assertEqual(states.rows[5]["n_prompts"], 2)
        every = states.layer(2)
        for i in (0, 1, 12, 22):  # one at a time, no batching: the same state in the same row
            alone = row_states(self.model, self.tokenizer, [rows[i]], ["last"], 1)["last"][2, 0].numpy()
            np.testing.assert_allclose(every[i], alone, atol=1e-4)
        singles = row_states(self.model, self.tokenizer, [make_rows(self.tokenizer, 14)[k] for k in (5, 13)], ["last"], 1)
        np.testing.assert_allclose(every[5], singles["last"][2].mean(0).numpy(), atol=1e-4)
        # The span position is the span's last token: with causal attention, the state there is
        # the last-token state of the prompt cut after the span.
        cut = rows[3]["prompts"][0]
        cut = cut[:cut.rfind(rows[3]["span"]) + len(rows[3]["span"])]
        alone = row_states(self.model, self.tokenizer, [{"prompts": [cut]}], ["last"], 1)["last"][1, 0].numpy()
        np.testing.assert_allclose(states.layer(1, "span", where=[3])[0], alone, atol=1e-4)

    def test_reader_filters_and_opens_only_the_shards_it_needs(self):
        rows = make_rows(self.tokenizer, 20)
        out = Path(self.tmp.name) / "reader"
        save_hidden_states(self.model, self.tokenizer, rows, out, batch_size=8, shard_rows=5)
        states = HiddenStates(out)
        full = states.layer(1)
        oslo = states.layer(1, where={"city": "Oslo"})
        self.assertEqual(oslo.shape, (3, 128))  # rows 0, 8, 16
        np.testing.assert_array_equal(oslo, full[[0, 8, 16]])
        np.testing.assert_array_equal(states.layer(-1, where=lambda r: r["id"] >= 18), states.layer(2)[18:])
        np.testing.assert_array_equal(states.layer(1, where=[7, 2]), full[[7, 2]])
        (out / "shards/shard_00003.safetensors").unlink()  # rows 15-19: not needed below
        np.testing.assert_array_equal(states.layer(1, where=lambda r: r["id"] < 15), full[:15])
        with self.assertRaisesRegex(UserError, "layer 3: .* has layers 0..2"):
            states.layer(3)
        with self.assertRaisesRegex(UserError, "position 'span'"):
            states.layer(0, "span")
        with self.assertRaisesRegex(UserError, "row 4 has no span"):
            save_hidden_states(self.model, self.tokenizer, [{**r, "span": "" if r["id"] == 4 else r["span"]} for r in rows],
                               Path(self.tmp.name) / "no_span", ("last", "span"))

    def test_killed_save_resumes_after_the_last_complete_shard(self):
        out = Path(self.tmp.name) / "killed"
        script = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from models import load_model
from twohop.interp.hidden_states import save_hidden_states
from tests.test_hidden_states import make_rows
model, tokenizer = load_model({str(self.model_path)!r})
def progress(done, total):
    if done >= 12:  # after the third shard: killed as a cluster would kill it
        os.kill(os.getpid(), signal.SIGKILL)
save_hidden_states(model, tokenizer, make_rows(tokenizer, 30), {str(out)!r}, batch_size=4, shard_rows=4,
                   progress=progress)
"""
        result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
        self.assertEqual(result.returncode, -9, result.stderr[-2000:])
        done = sorted(p.name for p in (out / "shards").glob("*.safetensors"))
        self.assertEqual(done, ["shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors"])
        with self.assertRaisesRegex(UserError, "incomplete"):
            HiddenStates(out)
        stamps = {p: p.stat().st_mtime_ns for p in (out / "shards").glob("*.safetensors")}
        seen = []
        save_hidden_states(self.model, self.tokenizer, make_rows(self.tokenizer, 30), out, batch_size=4, shard_rows=4,
                           progress=lambda done, total: seen.append(done))
        self.assertEqual({p: p.stat().st_mtime_ns for p in stamps}, stamps)  # the finished shards were kept
        clean = Path(self.tmp.name) / "clean"
        save_hidden_states(self.model, self.tokenizer, make_rows(self.tokenizer, 30), clean, batch_size=4, shard_rows=4)
        np.testing.assert_array_equal(HiddenStates(out).layer(2), HiddenStates(clean).layer(2))
        self.assertEqual((out / "rows.jsonl").read_text(), (clean / "rows.jsonl").read_text())


def write_states(folder: Path, rows: list, layer_vectors: np.ndarray) -> HiddenStates:
    """A states folder in the documented format, from hand-made vectors `[layers, rows, hidden]`."""
    (folder / "shards").mkdir(parents=True)
    save_file({"last": torch.tensor(layer_vectors, dtype=torch.float32)}, str(folder / "shards/shard_00000.safetensors"))
    lines = "".join(json.dumps({**r, "row": i}) + "\n" for i, r in enumerate(rows))
    (folder / "shards/shard_00000.jsonl").write_text(lines)
    (folder / "rows.jsonl").write_text(lines)
    (folder / "metadata.json").write_text(json.dumps({
        "complete": True, "layers": layer_vectors.shape[0], "hidden_size": layer_vectors.shape[2],
        "positions": ["last"], "shard_rows": len(rows)}))
    return HiddenStates(folder)


class AnalysisMathsTest(unittest.TestCase):
    def test_spearman_ranks_and_exact_permutation_p(self):
        np.testing.assert_array_equal(stats.ranks([10, 10, 30, 20]), [1.5, 1.5, 4, 3])
        self.assertAlmostEqual(spearman([1, 2, 3, 4], [1, 3, 2, 4]), 0.8)
        self.assertAlmostEqual(spearman([1, 2, 3, 4], [40, 30, 20, 10]), -1.0)
        # n = 4: of the 24 orderings, 1 gives rho = 1 and 3 give 0.8, and as many the negatives: p = 8/24.
        self.assertAlmostEqual(permutation_p([1, 2, 3, 4], [1, 3, 2, 4]), 8 / 24)
        self.assertAlmostEqual(permutation_p([1, 2, 3, 4], [1, 2, 3, 4]), 2 / 24)
        x = np.arange(30.0)
        self.assertLess(permutation_p(x, x + np.sin(x), samples=2000), 0.001)  # sampled, n! too large
        self.assertTrue(np.isnan(spearman([1, 2, 3], [5, 5, 5])))

    def test_pair_similarity_against_vectors_with_known_cosines(self):
        # e2 + r2 states equal their own e3's state (cos 1); different-valued pairs are orthogonal (cos 0),
        # except in layer 1, where every source vector is the negative of its own target (cos -1).
        entities = ["A", "B", "C"]
        target_rows = [{"entity": e, "attribute": "city", "value": v} for e, v in zip(entities, ["x", "y", "z"])]
        source_rows = [{"entity": e, "attribute": "city", "value": v} for e, v in zip(entities[::-1], ["z", "y", "x"])]
        basis = np.eye(3)
        target_vectors = np.stack([basis, basis])
        source_vectors = np.stack([basis[::-1], -basis[::-1]])  # stored in another row order
        with tempfile.TemporaryDirectory() as tmp:
            source = write_states(Path(tmp) / "source", source_rows, source_vectors)
            target = write_states(Path(tmp) / "target", target_rows, target_vectors)
            self.assertEqual(pair_similarity(source, target, 0, ["city"]), {"city": {"matched": 1.0, "mismatched": 0.0}})
            self.assertEqual(pair_similarity(source, target, 1, ["city"]), {"city": {"matched": -1.0, "mismatched": 0.0}})
        np.testing.assert_allclose(cosine_matrix(np.array([[3.0, 4.0]]), np.array([[4.0, 3.0], [0.0, 2.0]])), [[0.96, 0.8]])


if __name__ == "__main__":
    unittest.main()
