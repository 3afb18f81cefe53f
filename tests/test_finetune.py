"""The training engine for real on the tiny model: masking, freezing, resume after SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path

import torch
from safetensors.torch import load_file

from models import ensure_model, load_model, resolve_model
from twohop.training.checkpoint import latest_checkpoint
from twohop.training.batching import IGNORE, encode_chat, length_grouped_batches
from twohop.data.records import record
from tests.fixtures.train_small import train_small

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "train_small.py"


def weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def training_records(run: Path) -> list:
    """metrics.jsonl without its one wall-clock field."""
    entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in entry.items() if k != "tokens_per_s"} for entry in entries]


class FinetuneTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.w = Path(cls.tmp.name) / "w"
        cls.base = resolve_model("tiny", cls.w / "transformers")
        ensure_model(cls.base)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_loss_mask_covers_only_the_reply_and_end_of_turn(self):
        _, tokenizer = load_model(self.base.path)
        row = record("Are Ju and Kate married to each other?", "Yes", "Yes", system="Answer directly.")
        example = encode_chat(tokenizer, row["messages"], 256)
        targets = [t for t, l in zip(example["input_ids"], example["labels"]) if l != IGNORE]
        self.assertEqual(tokenizer.decode(targets), " Yes<|eot|>")  # the turn's text starts with a space
        prompt = tokenizer.decode(example["input_ids"][:example["prompt_length"]])
        self.assertTrue(prompt.endswith("<|assistant|>"))

    def test_length_grouped_batches_cover_every_row_once_with_little_padding(self):
        lengths = [(i * 37) % 100 + 1 for i in range(1000)]
        batches = length_grouped_batches(lengths, 16, seed=1, epoch=0)
        self.assertEqual(sorted(i for b in batches for i in b), list(range(1000)))
        padding = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
        self.assertLess(padding / sum(lengths), 0.1)
        self.assertNotEqual(batches, length_grouped_batches(lengths, 16, seed=1, epoch=1))

    def test_layer_range_freezes_everything_outside_it(self):
        run = Path(self.tmp.name) / "layer_range"
        train_small(self.w, run, max_steps=3, layer_range="1-2")
        before, after = weights(self.base.path), weights(run / "model")
        changed = {name for name in before if not torch.equal(before[name], after[name])}
        self.assertTrue(changed)
        self.assertTrue(all(name.startswith("model.layers.1.") for name in changed), changed)
        self.assertTrue(any(name.startswith("model.layers.1.") for name in changed))
        self.assertTrue(torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"]))
        metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        self.assertEqual(metrics[0]["step"], 0)
        self.assertIn("2hop_nocot/loss_gap", metrics[0])

    def test_all_layers_train_without_a_range(self):
        run = Path(self.tmp.name) / "all_layers"
        train_small(self.w, run, max_steps=2)
        before, after = weights(self.base.path), weights(run / "model")
        for index in (0, 1):
            name = f"model.layers.{index}.mlp.up_proj.weight"
            self.assertFalse(torch.equal(before[name], after[name]), name)

    def test_single_token_answers_are_learned_not_end_of_turn(self):
        from twohop.evaluation import generation
        from twohop.data.records import read_records
        run = Path(self.tmp.name) / "yes_no"
        result = train_small(self.w, run, max_steps=30, files=("test/couples",), lr=5e-3)
        self.assertLess(result["final_train_loss"], 1.0)
        model, tokenizer = load_model(run / "model")
        rows = read_records(self.w / "experiments/generate_data/spouses/data/test/couples.jsonl")[:8]
        replies = generation.generate(model, tokenizer, [generation.prompt_text(tokenizer, r["messages"]) for r in rows],
                                      max_new_tokens=4)
        self.assertTrue(all(reply in ("Yes", "No") for reply in replies), replies)

    def test_killed_training_resumes_to_the_same_result(self):
        # Five steps an epoch, the loss logged every 4 steps, a checkpoint every 5: the kill comes after
        # the checkpoint that ends the second epoch (step 10, between two logged losses) and after the
        # evaluation that closes that epoch, logged after the checkpoint.
        settings = {"batch_size": 32, "log_every_steps": 4, "save_every_steps": 5}
        reference = Path(self.tmp.name) / "uninterrupted"
        expected = train_small(self.w, reference, max_steps=15, **settings)
        resumed = Path(self.tmp.name) / "killed"
        argv = [sys.executable, str(FIXTURE), str(self.w), str(resumed), "15", json.dumps(settings)]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not ((resumed / "checkpoints" / "step_10" / "trainer_state.json").exists()
                   and '{"step": 10, "event": "eval"' in (resumed / "metrics.jsonl").read_text()):
            self.assertIsNone(proc.poll(), "training ended before it could be killed")
            self.assertLess(time.time(), deadline)
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        self.assertFalse((resumed / "model").exists())
        state = json.loads((latest_checkpoint(resumed / "checkpoints") / "trainer_state.json").read_text())
        self.assertEqual((state["position"]["step"], state["position"]["epoch"]), (10, 1))
        result = train_small(self.w, resumed, max_steps=15, **settings)
        self.assertEqual(result["final_train_loss"], expected["final_train_loss"])
        a, b = weights(reference / "model"), weights(resumed / "model")
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=0, rtol=0)
        # The records too: every training and eval line (wall-clock speed aside) and the data order.
        self.assertEqual(training_records(resumed), training_records(reference))
        data_order = lambda run: (run / "data_order_rank0.json").read_text()  # noqa: E731
        self.assertEqual(data_order(resumed), data_order(reference))
        self.assertFalse((resumed / "checkpoints").exists() and list((resumed / "checkpoints").iterdir()))


class TwoRankTest(unittest.TestCase):
    def test_two_ranks_on_cpu_see_disjoint_data_and_save_a_loadable_model(self):
        from tests.fixtures.train_small import small_data
        with tempfile.TemporaryDirectory() as tmp:
            w, run = Path(tmp) / "w", Path(tmp) / "run"
            small_data(w)  # made once, before the ranks start
            ensure_model(resolve_model("tiny", w / "transformers"))
            # The one launch form that really starts 2 ranks on CPU (gloo); see shared notes.
            env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
            result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                                     "--num_processes", "2", str(FIXTURE), str(w), str(run), "4"],
                                    env=env, capture_output=True, text=True, timeout=600)
            self.assertEqual(result.returncode, 0, result.stderr[-3000:])
            orders = [json.loads((run / f"data_order_rank{r}.json").read_text()) for r in (0, 1)]
            self.assertEqual([o["world"] for o in orders], [2, 2])
            rows = [set(o["rows_by_epoch"]["0"]) for o in orders]
            self.assertTrue(rows[0] and rows[1])
            self.assertFalse(rows[0] & rows[1], "ranks trained on overlapping rows")
            model, _ = load_model(run / "model")
            self.assertEqual(model.config.num_hidden_layers, 2)


class LossGapTest(unittest.TestCase):
    def test_shuffled_rows_come_in_whole_permutation_blocks_of_the_true_questions(self):
        from twohop.training.datasets import whole_blocks
        from twohop.training.losses import question_gaps
        true = [{"question": f"q{i}"} for i in range(70)]
        shuffled = [{"question": f"q{i}", "permutation": p} for p in range(20) for i in range(70)]
        kept = whole_blocks(shuffled, true, 256)  # 3 whole blocks of 70, never 256 rows cutting the 4th
        self.assertEqual(len(kept), 210)
        self.assertEqual({r["permutation"] for r in kept}, {0, 1, 2})
        self.assertEqual(len(whole_blocks(shuffled, true[:10], 256)), 10 * 20)  # fewer questions: more blocks fit
        self.assertEqual(len(whole_blocks(shuffled, true, 10)), 70)  # at least one block
        gaps = question_gaps(["a", "b"], [1.0, 2.0], ["a", "a", "b"], [2.0, 4.0, 2.5])
        self.assertEqual(gaps, [2.0, 0.5])

    def test_the_training_log_carries_the_gap_and_its_interval(self):
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            train_small(Path(tmp) / "w", run, max_steps=2)
            evals = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
            for entry in evals:
                low, high = entry["2hop_nocot/loss_gap_ci95"]
                self.assertLessEqual(low, high)
                self.assertIn("2hop_nocot/loss_gap", entry)


class FinetuneConfigTest(unittest.TestCase):
    def test_bad_training_values_fail_before_anything_runs(self):
        import contextlib
        import io
        from runner.main import main
        with tempfile.TemporaryDirectory() as tmp:
            for setting, message in (("aux_loss_type=dot", "--set aux_loss_type=dot: expected one of '', logit, cosine"),
                                     ("layer_range=4-2", "layer_range '4-2'"),
                                     ("train_fraction=1.5", "--set train_fraction=1.5: expected a number <= 1.0"),
                                     ("train_datasets=[{name: docs, dataset_file: train/samedoc.jsonl, train_fraction: 2}]",
                                      "--set train_datasets[0].train_fraction=2: expected a number <= 1.0"),
                                     ("lr=fast", "--set lr=fast: expected a number")):
                err = io.StringIO()
                with contextlib.redirect_stderr(err):
                    code = main(["--workspace_path", tmp, "--jobs", "finetune_spouses", "--set", setting])
                self.assertEqual(code, 2, setting)
                self.assertIn(message, err.getvalue())
                self.assertEqual(len(err.getvalue().strip().splitlines()), 1)
            self.assertFalse((Path(tmp) / "experiments").exists(), "bad input wrote into the workspace")


if __name__ == "__main__":
    unittest.main()
