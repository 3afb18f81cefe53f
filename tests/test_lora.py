"""LoRA through peft on random-init tiny models: what trains, what is saved, how every job loads it.

A few steps of the tiny Llama (in-process, the trainer kept to compare with what it saved) and of a
tiny GPT-2 through the real runner, followed by an intervention on its adapter; configs refused
before anything runs.
"""
import contextlib
import importlib.util
import io
import json
import logging
import shutil
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import torch
from safetensors.torch import load_file, save_file

from models import check_model, ensure_model, load_model, model_fingerprint, resolve_model
from models.families import decoder_layers
from runner.errors import UserError
from runner.files import sha256_file
from runner.main import main
from tests.fixtures.train_small import SMALL_WORLD, small_data, small_trainer, train_small
from twohop.training import checkpoint, lora

PROMPT = "<|user|>Where was Ada Hughes-Marsjanska's spouse born?<|eot|><|assistant|>"


def cli(*argv) -> tuple:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


def with_bitsandbytes():
    """find_spec as if bitsandbytes were installed (it is not in requirements.txt)."""
    real = importlib.util.find_spec
    return mock.patch("importlib.util.find_spec",
                      side_effect=lambda name, *rest: object() if name == "bitsandbytes" else real(name, *rest))


def logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(PROMPT, return_tensors="pt")).logits


def records(run: Path) -> list:
    entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in entry.items() if k != "tokens_per_s"} for entry in entries]


class Killed(Exception):
    pass


class LlamaAdapterTest(unittest.TestCase):
    """Six steps of a LoRA adapter (merge=true) on the tiny Llama; the trainer stays in memory."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.w, cls.run_dir = Path(cls.tmp.name) / "w", Path(cls.tmp.name) / "lora"
        small_data(cls.w)
        cls.base = resolve_model("tiny", cls.w / "transformers")
        ensure_model(cls.base)
        cls.base_hash = sha256_file(cls.base.path / "model.safetensors")
        cls.trainer = small_trainer(cls.w, cls.run_dir, max_steps=6, peft="lora", lr=2e-2, merge=True,
                                    save_every_steps=0)
        cls.result = cls.trainer.run()

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_only_the_adapter_trains_and_the_base_stays_bit_identical(self):
        self.assertEqual(sha256_file(self.base.path / "model.safetensors"), self.base_hash)
        base = load_file(self.base.path / "model.safetensors")
        state = self.trainer.model.state_dict()
        kept = {name.replace(".base_layer", ""): value for name, value in state.items() if "lora_" not in name}
        for name, value in base.items():
            self.assertTrue(torch.equal(kept[name], value), name)
        trained = [name for name, p in self.trainer.model.named_parameters() if p.requires_grad]
        self.assertTrue(trained and all("lora_" in name for name in trained), trained)
        self.assertEqual(self.result["trainable_parameters"], sum(state[n].numel() for n in trained))

    def test_the_adapter_is_saved_as_safetensors_with_its_base_named(self):
        folder = self.run_dir / "model"
        self.assertFalse(list(folder.glob("*.bin")) or (folder / "model.safetensors").exists())
        adapter = load_file(folder / "adapter_model.safetensors")
        self.assertEqual(len(adapter), 2 * 7 * 2)  # 2 layers x 7 projections x (A, B)
        self.assertTrue(all("lora_" in name for name in adapter))
        record = json.loads((folder / "base_model.json").read_text())
        self.assertEqual(Path(record["path"]), self.base.path.resolve())
        self.assertEqual((folder / record["relative_path"]).resolve(), self.base.path.resolve())
        self.assertFalse((self.run_dir / "checkpoints").exists() and list((self.run_dir / "checkpoints").iterdir()))

    def test_the_loss_decreases(self):
        # Each step's loss is of another batch (+-0.3 here), so the training curve is compared by halves; the
        # held-out loss is of the same rows before and after, and must fall by a margin.
        train = [entry["loss"] for entry in records(self.run_dir) if entry["event"] == "train"]
        self.assertLess(sum(train[3:]) / 3, sum(train[:3]) / 3, train)
        evals = [entry["2hop_nocot/loss"] for entry in records(self.run_dir) if entry["event"] == "eval"]
        self.assertLess(evals[-1], evals[0] - 0.1, evals)

    def test_every_job_loads_the_adapter_as_the_trained_model(self):
        model, tokenizer = load_model(self.run_dir / "model")
        self.assertFalse(any("lora_" in name for name, _ in model.named_parameters()))  # merged: a plain model
        self.assertEqual(len(decoder_layers(model)), 2)
        self.trainer.saved.eval()
        trained = logits(self.trainer.saved, tokenizer)
        torch.testing.assert_close(logits(model, tokenizer), trained, atol=1e-5, rtol=0)
        self.assertGreater((logits(load_model(self.base.path)[0], tokenizer) - trained).abs().max().item(), 1e-3)

    def test_the_merged_model_equals_the_adapter(self):
        merged = self.run_dir / "model_merged"
        self.assertTrue((merged / "config.json").is_file() and (merged / "model.safetensors").is_file())
        model, tokenizer = load_model(self.run_dir / "model")
        torch.testing.assert_close(logits(load_model(merged)[0], tokenizer), logits(model, tokenizer),
                                   atol=1e-5, rtol=0)

    def test_the_base_is_part_of_the_identity_and_a_changed_one_is_refused(self):
        copy_base, copy_adapter = Path(self.tmp.name) / "base_copy", Path(self.tmp.name) / "adapter_copy"
        shutil.copytree(self.base.path, copy_base)
        shutil.copytree(self.run_dir / "model", copy_adapter)
        lora.name_base(copy_adapter, copy_adapter, copy_base)
        self.assertNotEqual(model_fingerprint(copy_adapter), model_fingerprint(self.run_dir / "model"))
        load_model(copy_adapter)
        weights = load_file(copy_base / "model.safetensors")
        weights["model.norm.weight"] += 1
        save_file(weights, copy_base / "model.safetensors", metadata={"format": "pt"})
        with self.assertRaisesRegex(UserError, "changed since the adapter was trained"):
            load_model(copy_adapter)
        shutil.rmtree(copy_base)
        with self.assertRaisesRegex(UserError, "base model of adapter .* is missing"):
            model_fingerprint(copy_adapter)

    def test_a_killed_adapter_run_resumes_to_the_same_adapter(self):
        settings = {"peft": "lora", "lr": 2e-2, "save_every_steps": 2}
        reference, resumed = Path(self.tmp.name) / "uninterrupted", Path(self.tmp.name) / "killed"
        expected = train_small(self.w, reference, max_steps=4, **settings)
        save = checkpoint.save_checkpoint

        def save_then_die(*args):
            save(*args)
            raise Killed
        with mock.patch.object(checkpoint, "save_checkpoint", side_effect=save_then_die), self.assertRaises(Killed):
            train_small(self.w, resumed, max_steps=4, **settings)
        self.assertTrue((resumed / "checkpoints" / "step_2" / "model" / "adapter_model.safetensors").is_file())
        self.assertFalse((resumed / "model").exists())
        result = train_small(self.w, resumed, max_steps=4, **settings)
        self.assertEqual(result["final_train_loss"], expected["final_train_loss"])
        a, b = (load_file(run / "model" / "adapter_model.safetensors") for run in (reference, resumed))
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=0, rtol=0)
        self.assertEqual(records(resumed), records(reference))

    def test_layer_range_bounds_the_adapter_and_the_auxiliary_loss_trains_through_it(self):
        run = Path(self.tmp.name) / "layer_aux"
        train_small(self.w, run, max_steps=2, files=("train/2hop_nocot",), peft="lora", layer_range="1-2",
                    aux_loss_type="logit", aux_loss_coef=0.5)
        adapter = load_file(run / "model" / "adapter_model.safetensors")
        self.assertEqual({name.split(".")[4] for name in adapter}, {"1"}, sorted(adapter))
        self.assertTrue(all("aux_loss" in entry for entry in records(run) if entry["event"] == "train"))


class LayerOrderingAdapterTest(unittest.TestCase):
    def test_selective_stages_chain_adapters_on_their_halves(self):
        from runner.jobs.layer_ordering import JOB
        from twohop.training.stages import STAGES, check_config, run_chain
        with tempfile.TemporaryDirectory() as tmp:
            w, run_dir = Path(tmp) / "w", Path(tmp) / "chain"
            data = small_data(w)
            model = resolve_model("tiny", w / "transformers")
            ensure_model(model)
            config = JOB.subjobs[0].default_config(model)
            config.update(peft="lora", max_steps=2, batch_size=8, save_every_steps=0, eval_subsample=8,
                          stages=STAGES[:2],
                          evaluation={**config["evaluation"], "max_rows": 2, "memorisation_rows": 0, "bootstrap": 20,
                                      "cot_max_new_tokens": 8, "max_candidates": 0,
                                      "skip_kinds": ["hop_a", "hop_b", "couples", "in_context"]})
            with self.assertRaisesRegex(UserError, "delete_finished_weights: with peft"):
                check_config({**config, "delete_finished_weights": True})
            with self.assertRaisesRegex(UserError, "peft=qlora: each stage trains over the previous stage's adapter"):
                check_config({**config, "peft": "qlora"})
            records = run_chain(model.path, data, config, True, 1, run_dir, logging.getLogger("test_lora"))
            first, second = run_dir / "stage_1_b_facts/model", run_dir / "stage_2_a_facts/model"
            def layers(folder):
                return {name.split(".")[4] for name in load_file(folder / "adapter_model.safetensors")}
            self.assertEqual((layers(first), layers(second)), ({"1"}, {"0"}))  # B facts upper half, A facts lower
            record = json.loads((second / "base_model.json").read_text())
            self.assertEqual((second / record["relative_path"]).resolve(), first.resolve())
            self.assertEqual([r["layer_range"] for r in records], ["1-2", "0-1"])
            self.assertIn("acc_2hop_nocot", records[1]["metrics"])


class RefusedTest(unittest.TestCase):
    """Adapter settings that cannot run: one line, exit 2, nothing written."""

    def refused(self, *settings, model="tiny") -> str:
        with tempfile.TemporaryDirectory() as tmp:
            w = Path(tmp) / "w"
            if model != "tiny":
                build_gpt2(w / "transformers" / model)
            sets = [a for s in settings for a in ("--set", s)]
            code, err = cli("--workspace_path", w, "--jobs", "finetune_spouses", "--model", model, *sets)
            self.assertEqual(code, 2, err)
            self.assertEqual(len(err.strip().splitlines()), 1, err)
            self.assertFalse((w / "experiments").exists(), "a refused config wrote into the workspace")
        return err

    def test_qlora_without_cuda_or_bitsandbytes(self):
        with mock.patch("importlib.util.find_spec", return_value=None):
            self.assertIn("needs the bitsandbytes package", self.refused("peft=qlora"))
        with mock.patch("torch.cuda.is_available", return_value=False), with_bitsandbytes():
            self.assertIn("finetune_spouses: peft=qlora: 4-bit base weights (bitsandbytes) need a CUDA device",
                          self.refused("peft=qlora"))

    def test_qlora_under_slurm_is_checked_on_the_jobs_node_not_the_login_node(self):
        """A login node without a GPU submits qlora jobs; each checks CUDA where it runs (load_base)."""
        with tempfile.TemporaryDirectory() as tmp, mock.patch("torch.cuda.is_available", return_value=False), \
                with_bitsandbytes():
            code, err = cli("--workspace_path", Path(tmp) / "w", "--jobs", "finetune_spouses", "--set", "peft=qlora",
                            "--launcher", "slurm", "--dry_run")
            self.assertEqual(code, 0, err)
            with self.assertRaisesRegex(UserError, "need a CUDA device"):
                lora.load_base(Path(tmp), {"peft": "qlora"}, "cpu")

    def test_an_unknown_target_module_is_named(self):
        err = self.refused("peft=lora", "lora_target_modules=[c_attn, q_proj]", model="local-gpt2")
        self.assertIn("lora_target_modules: 'q_proj' is not a linear module of this gpt2 model", err)
        self.assertIn("c_fc", err)

    def test_adapter_keys_need_peft(self):
        self.assertIn("lora_rank=4 applies to an adapter, but peft is ''", self.refused("lora_rank=4"))
        self.assertIn("merge=true applies to an adapter", self.refused("merge=true"))


def build_gpt2(folder: Path) -> Path:
    """A random-init GPT-2 (2 layers) with the embedded model's tokenizer and chat template."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from models.tiny import EOT, train_tokenizer, vocabulary_corpus
    tokenizer = train_tokenizer(vocabulary_corpus(), 4096)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=512, vocab_size=len(tokenizer),
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=eot,
                                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = [eot, tokenizer.eos_token_id]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class Gpt2RunnerTest(unittest.TestCase):
    """finetune_spouses with peft=lora on a tiny GPT-2 (a saved model: finetune_base is a no-op), then
    intervene_patch on what it trained, through the real CLI."""

    def test_finetune_then_intervene_on_the_adapter(self):
        with tempfile.TemporaryDirectory() as tmp:
            w = Path(tmp) / "w"
            build_gpt2(w / "transformers" / "local-gpt2")
            code, err = cli("--workspace_path", w, "--jobs", "finetune_spouses", "intervene_patch", "--model",
                            "local-gpt2", "--set", "peft=lora", "--set", "finetune.max_steps=3", "--set",
                            "finetune.batch_size=8", "--set", "finetune.eval_subsample=8", "--set", "finetune.lr=1e-2",
                            "--set", "max_items=4", "--set", "bootstrap=10", *SMALL_WORLD)
            self.assertEqual(code, 0, err[-3000:])
            model_dir = w / "experiments/finetune/spouses/local-gpt2/seed_1/model"
            adapter = load_file(model_dir / "adapter_model.safetensors")
            self.assertEqual({name.split(".")[-3] for name in adapter}, {"c_attn", "c_proj", "c_fc"})
            results = json.loads((w / "experiments/intervene/patch/local-gpt2/seed_1/results.json").read_text())
            self.assertEqual(results["model"], str(model_dir))
            self.assertLess(max(results["parity"].values()), 1e-4)
            check_model(resolve_model(str(model_dir), w / "transformers"))  # an adapter folder is a valid --model


if __name__ == "__main__":
    unittest.main()
