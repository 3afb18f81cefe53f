"""The embedded tiny model and local model loading, for real: build, save, reload, compare."""
import json
import shutil
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

import torch

from models import ensure_model, load_model, model_fingerprint, resolve_model
from models.families import decoder_layers, final_norm, unembedding
from models.tiny import ENTITY_WORD_FILES, PROJECT_DATA
from runner.errors import UserError
from runner.main import main
from twohop.data import tables

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class TinyModelTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.transformers = Path(cls.tmp.name) / "transformers"
        cls.ref = resolve_model("tiny", cls.transformers)
        ensure_model(cls.ref)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_saved_folder_is_plain_hugging_face_with_safetensors(self):
        files = {p.name for p in self.ref.path.iterdir()}
        self.assertTrue({"config.json", "model.safetensors", "tokenizer.json", "embedded.json"} <= files, files)
        self.assertFalse([f for f in files if f.endswith((".bin", ".pt", ".pkl"))])
        config = json.loads((self.ref.path / "config.json").read_text())
        self.assertEqual(config["model_type"], "llama")
        self.assertEqual((config["hidden_size"], config["num_hidden_layers"]), (128, 2))

    def test_reload_gives_identical_logits_and_chat_format(self):
        model, tokenizer = load_model(self.ref.path)
        messages = [{"role": "user", "content": "Where was Ada Hughes-Marsjanska born?"}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        self.assertTrue(prompt.endswith("<|assistant|>"), prompt)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        # Each turn's text is encoded with a leading space (so a name in a question and the same name
        # opening a reply are one token); decoding shows that space, and re-encoding is exact.
        decoded = tokenizer.decode(ids[0])
        self.assertEqual(decoded.replace("|> ", "|>"), prompt)
        self.assertEqual(tokenizer(decoded, add_special_tokens=False).input_ids, ids[0].tolist())
        reply = tokenizer("<|assistant|>Ada", add_special_tokens=False).input_ids[1:]
        self.assertEqual(reply, tokenizer(" Ada", add_special_tokens=False).input_ids)
        self.assertEqual(len(reply), 1, "a first name is one token")
        with torch.no_grad():
            logits = model(ids).logits
        again, _ = load_model(self.ref.path)
        with torch.no_grad():
            self.assertTrue(torch.equal(logits, again(ids).logits))
        self.assertEqual(len(decoder_layers(model)), 2)
        self.assertIs(unembedding(model), model.lm_head)
        self.assertIs(final_norm(model), model.model.norm)

    def test_an_entity_is_the_same_tokens_wherever_it_stands(self):
        """A name opening a line (the in-context facts) or after an opening bracket or quote is the same
        tokens as after a space (the question), for every first name, last-name part and city; and
        decoding still gives back the text, inserted spaces removed."""
        _, tokenizer = load_model(self.ref.path)
        entities = [line for name in ENTITY_WORD_FILES for line in tables.read_lines(PROJECT_DATA / name)]
        contexts = {"after a space": "is {}", "opening a line": "is.\n{}", "after a blank line": "is.\n\n{}",
                    "after a tab": "is\t{}", "after a bracket": "is ({}", "after a quote": 'is "{}'}
        mismatches = []
        for entity in entities:
            alone = tokenizer(f" {entity}", add_special_tokens=False).input_ids
            for where, context in contexts.items():
                ids = tokenizer(context.format(entity), add_special_tokens=False).input_ids
                if ids[len(ids) - len(alone):] != alone:
                    mismatches.append(f"{entity!r} {where}: {tokenizer.convert_ids_to_tokens(ids)}")
        self.assertEqual(mismatches, [], f"{len(mismatches)} of {len(entities) * len(contexts)}")
        self.assertGreater(len(entities), 350)  # every name list and the cities were read
        for text in ("Facts:\nUlla Berg's spouse is Kate.\n\n( x ) \"y\" \t z\n\n\n end", "a\n b\n  c"):
            ids = tokenizer(text, add_special_tokens=False).input_ids
            self.assertEqual(tokenizer.decode(ids), " " + text)  # the turn's leading space, as above

    def test_build_is_deterministic_per_seed(self):
        same = resolve_model("tiny-h128-l2", Path(self.tmp.name) / "other")
        other_seed = resolve_model("tiny", Path(self.tmp.name) / "other", seed=7)
        ensure_model(same)
        ensure_model(other_seed)
        self.assertEqual(model_fingerprint(same.path), model_fingerprint(self.ref.path))
        self.assertEqual((same.path / "tokenizer.json").read_bytes(), (self.ref.path / "tokenizer.json").read_bytes())
        self.assertNotEqual(model_fingerprint(other_seed.path), model_fingerprint(self.ref.path))

    def test_name_under_transformers_and_path_resolve_to_the_same_folder(self):
        by_name = resolve_model("tiny-h128-l2", self.transformers)
        copy = self.transformers / "my-model"
        if not copy.exists():
            shutil.copytree(self.ref.path, copy)
        self.assertEqual(resolve_model("my-model", self.transformers).path, copy.resolve())
        by_path = resolve_model(str(copy), Path(self.tmp.name) / "elsewhere")
        self.assertEqual(by_path.path, copy.resolve())
        self.assertNotEqual(by_path.tag, "my-model")  # paths outside W/transformers get a unique tag
        self.assertEqual(by_name.path, self.ref.path)
        load_model(copy)

    def test_missing_model_is_one_clear_error_listing_where_it_looked(self):
        with self.assertRaises(UserError) as caught:
            resolve_model("Llama-3-8B-Instruct", self.transformers)
        message = str(caught.exception)
        self.assertIn(str(self.transformers / "Llama-3-8B-Instruct"), message)
        self.assertIn("--model tiny", message)

    def test_broken_model_folder_is_a_clear_error(self):
        broken = Path(self.tmp.name) / "broken"
        shutil.copytree(self.ref.path, broken, dirs_exist_ok=True)
        (broken / "model.safetensors").rename(broken / "pytorch_model.bin")
        with self.assertRaisesRegex(UserError, r"no \*\.safetensors weights .*pytorch_model\.bin"):
            load_model(broken)
        (broken / "config.json").unlink()
        with self.assertRaisesRegex(UserError, "no config.json"):
            load_model(broken)

    def test_cli_reports_a_missing_model_and_exits_nonzero(self):
        from tests.fixtures.toy_registry import toy_registry
        w = Path(self.tmp.name) / "cli"
        code = main(["--workspace_path", str(w), "--jobs", "alpha_make", "--model", "no-such-model"],
                    registry=toy_registry())
        self.assertEqual(code, 2)
        self.assertFalse((w / "experiments" / "alpha").exists())


class ImportShadowingTest(unittest.TestCase):
    def test_import_datasets_is_hugging_face_from_the_project_root(self):
        self.assertFalse((PROJECT_ROOT / "datasets" / "__init__.py").exists())
        result = subprocess.run(
            [sys.executable, "-c", "import datasets; print(datasets.__file__); print(hasattr(datasets, 'load_dataset'))"],
            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)
        path, has_loader = result.stdout.split()
        self.assertIn("site-packages", path)
        self.assertEqual(has_loader, "True")


if __name__ == "__main__":
    unittest.main()
