"""Peak memory: the estimate against a measured training process, gradient checkpointing (same training,
with the auxiliary loss and a layer range), the dry run's estimates and the refusal of a run that cannot fit."""
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import unittest
from dataclasses import replace
from pathlib import Path
from unittest import mock

import torch
from safetensors.torch import load_file

from tests.fixtures.train_small import train_small
from twohop.training import memory

BENCH = Path(__file__).resolve().parents[1] / "bench" / "memory_estimate.py"
GIB = memory.GIB


def llama_8b():
    from transformers import LlamaConfig
    return memory.model_shape(LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                          num_key_value_heads=8, intermediate_size=14336, vocab_size=128256))


class EstimateTest(unittest.TestCase):
    def test_the_estimate_is_within_30_percent_of_a_measured_10m_parameter_training_process(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, str(BENCH), "--measure", "10M", "--steps", "4"], env=env,
                             capture_output=True, text=True, timeout=900, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        self.assertGreater(result["parameters"], 10e6)
        self.assertLess(abs(result["estimate"] / result["measured"] - 1), 0.3, result)

    def test_8b_full_fine_tuning_needs_far_more_than_an_80gb_gpu_and_each_alternative_fits(self):
        model = llama_8b()
        self.assertAlmostEqual(model.parameters / 1e9, 8.03, places=2)
        run = memory.TrainingShape(trainable=model.parameters, largest_trainable=model.largest_tensor, batch=64,
                                   length=512, reply_tokens=64 * 512, bf16=True, checkpointing=False, cuda=True)
        full = memory.estimate_peak_memory(model, run)
        self.assertEqual((full.weights, full.gradients, full.optimizer), (4 * model.parameters, 4 * model.parameters,
                                                                          8 * model.parameters))
        budget = memory.FIT_SHARE * 80 * GIB
        found = dict(memory.alternatives(model, run, budget))
        self.assertTrue(all(peak <= budget for peak in found.values()), found)
        self.assertEqual([s.split(" batch_size")[0] for s in found],  # no batch makes the full model fit: its
                         ["gradient_checkpointing=true peft=lora",  # fp32 weights and AdamW alone take 90 GiB
                          "gradient_checkpointing=true FSDP over 4 GPUs (configs/accelerate_fsdp.yaml)"])

    def test_checkpointing_fsdp_and_lora_shrink_what_they_should(self):
        model = llama_8b()
        run = memory.TrainingShape(trainable=model.parameters, largest_trainable=model.largest_tensor, batch=8,
                                   length=512, reply_tokens=8 * 32, bf16=True, checkpointing=False, cuda=True)
        plain = memory.estimate_peak_memory(model, run)
        checkpointed = memory.estimate_peak_memory(model, replace(run, checkpointing=True))
        self.assertLess(checkpointed.activations * 10, plain.activations)
        sharded = memory.estimate_peak_memory(model, replace(run, shards=4))
        self.assertEqual(sharded.optimizer, plain.optimizer // 4)
        lora = memory.estimate_peak_memory(model, replace(run, trainable=memory.lora_parameters(model, 16)))
        self.assertEqual(lora.weights, plain.weights)
        self.assertLess(lora.optimizer, plain.optimizer / 100)

    def test_auto_checkpointing_is_on_for_models_over_1b_parameters_on_a_gpu(self):
        self.assertTrue(memory.use_checkpointing("auto", 2 * 10**9, cuda=True))
        self.assertFalse(memory.use_checkpointing("auto", 2 * 10**9, cuda=False))
        self.assertFalse(memory.use_checkpointing("auto", 5 * 10**8, cuda=True))
        self.assertTrue(memory.use_checkpointing(True, 1000, cuda=False))


class CheckpointingTest(unittest.TestCase):
    """Two steps of the tiny model with and without checkpointing: the same losses and weights."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.w = Path(cls.tmp.name) / "w"

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def assert_same_training(self, name: str, **settings):
        import transformers.modeling_utils
        results, weights = [], []
        for checkpointing in (False, True):
            run = Path(self.tmp.name) / f"{name}_{checkpointing}"
            with mock.patch.object(transformers.modeling_utils, "checkpoint",
                                   wraps=transformers.modeling_utils.checkpoint) as recompute:
                results.append(train_small(self.w, run, max_steps=2, gradient_checkpointing=checkpointing, **settings))
            self.assertEqual(recompute.called, checkpointing)  # each decoder layer's forward goes through it
            weights.append(load_file(str(run / "model" / "model.safetensors")))
        self.assertAlmostEqual(results[0]["final_train_loss"], results[1]["final_train_loss"], delta=1e-5)
        for key in weights[0]:
            torch.testing.assert_close(weights[0][key], weights[1][key], atol=1e-5, rtol=0)

    def test_the_auxiliary_loss_on_hidden_states_trains_the_same(self):
        self.assert_same_training("aux", files=("train/a_demoed", "train/2hop_nocot"), aux_loss_type="logit",
                                  aux_loss_coef=1.0)

    def test_a_layer_range_trains_the_same(self):
        self.assert_same_training("layers", layer_range="1-2")


class RunnerTest(unittest.TestCase):
    def cli(self, *args):
        from runner.main import main
        out, err = io.StringIO(), io.StringIO()
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["--workspace_path", str(Path(tmp) / "w"), *args])
            written = Path(tmp, "w").exists()
        return code, out.getvalue(), err.getvalue(), written

    def test_dry_run_prints_the_estimate_of_each_run_that_trains(self):
        code, out, _, _ = self.cli("--jobs", "finetune_spouses", "--dry_run", "--set", "gradient_checkpointing=true")
        self.assertEqual(code, 0)
        lines = [line for line in out.splitlines() if "memory:" in line]
        self.assertEqual(len(lines), 2, out)  # finetune_base and finetune_spouses; not the data generation
        self.assertIn(" peak (weights", lines[1])
        self.assertIn("at 16 rows x 512 tokens (batch_size x max_length), checkpointing on, fp32", lines[1])
        self.assertIn("available on cpu", lines[1])

    def test_a_run_that_cannot_fit_is_refused_before_anything_runs_naming_what_fits(self):
        small = memory.Device("cuda:0", True, 64 * 2**20)
        with mock.patch.object(memory, "this_device", return_value=small):
            code, _, err, written = self.cli("--jobs", "finetune_spouses", "--set", "batch_size=64",
                                             "--set", "max_length=256")
        self.assertEqual(code, 2)
        self.assertFalse(written)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn("finetune_base", err)
        self.assertIn("more than 90% of the 64 MiB available on cuda:0. Fits with: gradient_checkpointing=true "
                      "batch_size=", err)
        self.assertNotIn("peft=lora", err)  # finetune_base (the tiny model's pretraining) takes no adapter


if __name__ == "__main__":
    unittest.main()
