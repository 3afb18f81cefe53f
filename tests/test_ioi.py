"""IOI task sets (seed note 004) and fine-tuning on them: data per model tokenizer, clean/corrupted
pairs, splits, the card, and single-token completions that train on the name (not end-of-text)."""
import contextlib
import io
import json
import logging
import os
import random
import tempfile
import unittest
from pathlib import Path
from types import SimpleNamespace

import torch

from models import load_model, load_tokenizer
from models.tiny import train_tokenizer, vocabulary_corpus
from runner import config as typed
from runner.errors import UserError
from runner.main import main
from tests.fixtures.train_small import SMALL_WORLD
from twohop.data import ioi, tables
from twohop.data.records import read_records
from twohop.training.batching import IGNORE, encode_rows
from twohop.training.config import TrainingConfig
from twohop.training.trainer import train

SMALL = {"data_seed": 0, "train_per_family": 40, "test_per_family": 16, "test_name_fraction": 0.25}
EOT = "<|endoftext|>"


def gpt2_style(folder: Path, names: list, **shape) -> Path:
    """A GPT-2-like model: byte-level BPE without a prefix space (only `names` become single tokens),
    <|endoftext|> as BOS and EOS, trimmed offsets, no chat template, random-init GPT2LMHeadModel
    (`shape`: GPT2Config keys over the tiny default, e.g. GPT-2 small's for bench/gpt2_ioi_time.py)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    templates = [t for spec in ioi.families().values() for t in spec["templates"]]
    tokenizer.train_from_iterator(templates * 5 + [f"So {name} came" for name in names] * 40, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=EOT, eos_token=EOT, unk_token=EOT)
    config = GPT2Config(**{"vocab_size": len(wrapped), "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128,
                           **shape}, bos_token_id=wrapped.bos_token_id, eos_token_id=wrapped.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    wrapped.save_pretrained(folder)
    return folder


def generate(model_path: Path, out: Path, **config) -> Path:
    ctx = SimpleNamespace(config={**SMALL, **config}, run_dir=out, log=logging.getLogger("test_ioi"),
                          model=SimpleNamespace(path=model_path, name=model_path.name))
    ioi.generate(ctx)
    return out / "data"


def files_of(data_dir: Path) -> dict:
    return {str(p.relative_to(data_dir)): p.read_bytes() for p in sorted(data_dir.rglob("*")) if p.is_file()}


class IoiDataTest(unittest.TestCase):
    """The same checks on the tiny tokenizer (every name one token) and a GPT-2-style one (some are not)."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        root = Path(cls.tmp.name)
        first_names, _ = tables.names()
        cls.tiny_path = root / "tiny-tokenizer"
        train_tokenizer(vocabulary_corpus(), 4096).save_pretrained(cls.tiny_path)
        cls.gpt2_path = gpt2_style(root / "gpt2-style", first_names[::3])
        cls.data = {name: generate(path, root / f"run-{name}")
                    for name, path in (("tiny", cls.tiny_path), ("gpt2", cls.gpt2_path))}
        cls.tokenizers = {"tiny": load_tokenizer(cls.tiny_path), "gpt2": load_tokenizer(cls.gpt2_path)}

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def each(self):
        """(tokenizer name, tokenizer, card, {file: rows}) per tokenizer."""
        for name, data in self.data.items():
            card = json.loads((data / "card.json").read_text())
            yield name, self.tokenizers[name], card, {f: read_records(data / f"{f}.jsonl") for f in card["files"]}

    def test_same_seed_same_bytes_and_another_seed_differs(self):
        root = Path(self.tmp.name)
        self.assertEqual(files_of(generate(self.gpt2_path, root / "again")), files_of(self.data["gpt2"]))
        reseeded = files_of(generate(self.gpt2_path, root / "reseeded", data_seed=1))
        self.assertEqual(reseeded.keys(), files_of(self.data["gpt2"]).keys())
        self.assertNotEqual(reseeded["train/3obj.jsonl"], files_of(self.data["gpt2"])["train/3obj.jsonl"])

    def test_clean_and_corrupted_prompts_are_token_aligned_with_different_answers(self):
        for name, tokenizer, card, files in self.each():
            for file, rows in files.items():
                for row in rows:
                    clean = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
                    corrupted = tokenizer(row["corrupted_prompt"], add_special_tokens=False)["input_ids"]
                    self.assertEqual(len(clean), len(corrupted), (name, row["prompt"]))
                    mentions = {m["token"]: m["slot"] for m in row["mentions"]}
                    for position in (i for i, (a, b) in enumerate(zip(clean, corrupted)) if a != b):
                        self.assertIn(mentions.get(position), (card["families"][row["family"]]["answer_slot"],
                                                               card["families"][row["family"]]["foil_slot"]))
                    for position, slot in mentions.items():
                        self.assertEqual(tokenizer.decode([clean[position]]).strip(), row["names"][slot])
                        self.assertEqual(tokenizer.decode([corrupted[position]]).strip(), row["corrupted_names"][slot])
                        start = next(m["char"] for m in row["mentions"] if m["token"] == position)
                        self.assertEqual(row["prompt"][start:start + len(row["names"][slot])], row["names"][slot])
                    self.assertNotEqual(row["answer"], row["corrupted_answer"])
                    self.assertEqual(row["corrupted_answer"], row["foil"])
                    self.assertTrue({row["answer"], row["foil"]} <= set(row["candidates"]))
                    self.assertEqual(row["messages"][-1], {"role": "assistant", "content": row["answer"]})
                    self.assertEqual(row["completion"], " " + row["answer"])
                    self.assertEqual(ioi.pair_problem(tokenizer, row), "")

    def test_every_family_is_on_the_card_with_its_chance(self):
        families = ioi.families()
        for name, _, card, files in self.each():
            self.assertEqual(sorted(card["families"]), sorted(families), name)
            for family, spec in families.items():
                entry = card["families"][family]
                self.assertAlmostEqual(entry["chance"], 1 / len(spec["slots"]))
                self.assertEqual(entry["names_per_prompt"], len(spec["slots"]))
                test = card["tests"][f"test/{family}"]
                self.assertEqual((test["kind"], test["candidates"]), ("ioi", len(card["names"]["test"])))
                self.assertEqual((card["files"][f"train/{family}"], card["files"][f"test/{family}"]), (40, 16))
                self.assertTrue(all(len(row["candidates"]) == len(spec["slots"]) for row in files[f"test/{family}"]))
        self.assertEqual(sorted(families), ["2obj", "3obj", "chain", "distractor", "room_2obj", "room_3obj"])

    def test_splits_share_no_name_and_no_prompt(self):
        for name, _, card, files in self.each():
            train = [row for f, rows in files.items() if f.startswith("train/") for row in rows]
            test = [row for f, rows in files.items() if f.startswith("test/") for row in rows]
            train_names = {n for row in train for n in row["candidates"]}
            test_names = {n for row in test for n in row["candidates"]}
            self.assertFalse(train_names & test_names, name)
            self.assertLessEqual(test_names, set(card["names"]["test"]))
            self.assertLessEqual(train_names, set(card["names"]["train"]))
            self.assertFalse({r["prompt"] for r in train} & {r["prompt"] for r in test})
            for rows in files.values():
                self.assertEqual(len({r["prompt"] for r in rows}), len(rows), "prompts repeat within a file")

    def test_names_are_single_tokens_of_each_tokenizer(self):
        listed, _ = tables.names()
        for name, tokenizer, card, _ in self.each():
            usable = card["names"]["train"] + card["names"]["test"]
            for person in usable:
                self.assertEqual(len(tokenizer(" " + person, add_special_tokens=False)["input_ids"]), 1, person)
            for person in card["names"]["left_out"]:
                self.assertGreater(len(tokenizer(" " + person, add_special_tokens=False)["input_ids"]), 1, person)
            self.assertEqual(len(usable) + len(card["names"]["left_out"]), len(listed))
        tiny, gpt2 = (json.loads((self.data[n] / "card.json").read_text())["names"] for n in ("tiny", "gpt2"))
        self.assertEqual(tiny["left_out"], [])
        self.assertTrue(gpt2["left_out"], "the GPT-2-style tokenizer should split some names")

    def test_loss_mask_covers_the_name_in_both_formats(self):
        rows = read_records(self.data["tiny"] / "test/3obj.jsonl")[:4]
        tiny = self.tokenizers["tiny"]
        for row, example in zip(rows, encode_rows(tiny, rows, {"max_length": 128})):
            targets = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE]
            self.assertEqual(tiny.decode(targets), f" {row['answer']}<|eot|>")  # the chat template's reply
        gpt2 = self.tokenizers["gpt2"]
        self.assertIsNone(gpt2.chat_template)
        rows = read_records(self.data["gpt2"] / "test/3obj.jsonl")[:4]
        for row, example in zip(rows, encode_rows(gpt2, rows, {"max_length": 128})):
            targets = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE]
            self.assertEqual(targets, gpt2(row["completion"], add_special_tokens=False)["input_ids"])
            self.assertEqual(len(targets), 1)  # the name alone: no end-of-text to collapse to
            self.assertEqual(example["input_ids"][0], gpt2.bos_token_id)
            self.assertEqual(example["input_ids"][1:-1], gpt2(row["prompt"], add_special_tokens=False)["input_ids"])

    def test_the_tiny_tokenizer_is_trained_without_the_ioi_templates(self):
        # Adding them would change the tiny model every workspace builds (same build version, other merges).
        self.assertFalse([line for line in vocabulary_corpus() if "{object}" in line or "{thing}" in line])

    def test_bad_templates_and_too_few_names_are_one_line(self):
        spec = {"answer": "B", "foil": "A"}
        fillers = {"place": ["park"]}
        self.assertIn("must follow a space", ioi.check_template("{A} and {B} met at the {place}.", spec, fillers))
        self.assertIn("must follow a space", ioi.check_template("So {A}s and {B} met.", spec, fillers))
        self.assertIn("unknown field(s) ['room']", ioi.check_template("So {A} and {B} left the {room}.", spec, fillers))
        self.assertIn("the foil slot A", ioi.check_template("So {C} and {B} left.", spec, fillers))
        self.assertEqual(ioi.check_template("So {A} and {B} left the {place}.", spec, fillers), "")
        with self.assertRaisesRegex(UserError, "each side needs at least 3") as caught:
            ioi.split_names(["Ada", "Bo", "Cy", "Di", "Ed"], 0.25, 3, random.Random(0))
        self.assertNotIn("\n", str(caught.exception))
        with self.assertRaisesRegex(UserError, "make only 24; lower"):
            ioi.sample_items("room_2obj", ioi.families()["room_2obj"], {}, ["Ada", "Bo", "Cy"], 25, random.Random(0))


class IoiRunnerTest(unittest.TestCase):
    def test_bad_config_is_refused_with_one_line_before_anything_runs(self):
        with tempfile.TemporaryDirectory() as tmp:
            for setting, message in (("test_name_fraction=1", "test_name_fraction: must be between 0 and 1"),
                                     ("train_per_family=0", "expected a whole number >= 1")):
                err = io.StringIO()
                with contextlib.redirect_stderr(err):
                    code = main(["--workspace_path", tmp, "--jobs", "generate_data_ioi", "--set", setting])
                self.assertEqual((code, err.getvalue().count("\n")), (2, 1), err.getvalue())
                self.assertIn(message, err.getvalue())
            self.assertFalse((Path(tmp) / "experiments" / "generate_data").exists())

    def finetune(self, w: Path, *argv) -> Path:
        """Run finetune_ioi_3obj for 3 steps on small data; its run folder, checked."""
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["--workspace_path", str(w), "--jobs", "finetune_ioi_3obj", *argv,
                         "--set", "generate_data_ioi.train_per_family=40", "--set", "generate_data_ioi.test_per_family=8",
                         "--set", "finetune_ioi_3obj.max_steps=3", "--set", "finetune_ioi_3obj.eval_subsample=8"])
        self.assertEqual(code, 0, err.getvalue()[-2000:])
        run = next((w / "experiments" / "finetune" / "ioi_3obj").glob("*/seed_1"))
        config = json.loads((run / "config.json").read_text())["config"]
        self.assertEqual([e["dataset_file"] for e in config["train_datasets"]], ["train/3obj.jsonl"])
        self.assertTrue((run / "model" / "model.safetensors").is_file())
        evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
        self.assertEqual([e["step"] for e in evals], [0, 3])  # before and after, on every family
        for family in ioi.families():
            self.assertIn(f"{family}/accuracy", evals[-1])
        return run

    def test_a_few_steps_of_finetune_ioi_3obj_on_a_local_gpt2_style_model(self):
        """As `--model gpt2` with GPT-2 small under W/transformers/gpt2: no chat template, so raw text;
        finetune_base is a no-op and the fine-tune starts from the model itself."""
        with tempfile.TemporaryDirectory() as tmp:
            w = Path(tmp) / "w"
            first_names, _ = tables.names()
            gpt2_style(w / "transformers" / "gpt2", first_names[::3])
            run = self.finetune(w, "--model", "gpt2", *SMALL_WORLD)
            self.assertEqual(run.parent.name, "gpt2")
            config = json.loads((run / "config.json").read_text())["config"]
            self.assertEqual((config["lr"], config["max_length"]), (5e-5, 128))  # the real-model recipe
            card = json.loads((w / "experiments/generate_data/ioi/gpt2/data/card.json").read_text())
            self.assertTrue(card["names"]["left_out"])  # filtered to this tokenizer's single-token names

    @unittest.skipIf(os.environ.get("TWOHOP_SKIP_SLOW") == "1", "slow: trains finetune_base (TWOHOP_SKIP_SLOW=1)")
    def test_a_few_steps_of_finetune_ioi_3obj_on_the_tiny_default(self):
        with tempfile.TemporaryDirectory() as tmp:
            self.finetune(Path(tmp) / "w", *SMALL_WORLD, "--set", "finetune_base.max_steps=1",
                          "--set", "finetune_base.base_people=20", "--set", "finetune_base.copy_rows=50",
                          "--set", "finetune_base.in_context_per_round=10")


class SingleTokenCompletionTest(unittest.TestCase):
    """Seed note 004's bug: a fine-tune on one-name completions whose model then answers end-of-text.
    Raw text trains on the name alone, so a few steps from random init already answer names. (In the
    chat format the reply is the name and <|eot|>; from random init the tiny model first answers <|eot|>
    everywhere, still after 50 steps at the recipe's lr 3e-3: the seed's collapse. From finetune_base's
    model it answers names after 30 steps. The chat loss mask is tested above.)"""

    def first_tokens(self, model_path: Path, data: Path, steps: int) -> tuple:
        """(the trained model's argmax after each of 8 test prompts, the names' tokens, the stop tokens)."""
        from twohop.evaluation.generation import prompt_text, stop_token_ids
        rows = read_records(data / "train/3obj.jsonl")
        config = {**typed.defaults(TrainingConfig), "lr": 1e-2, "batch_size": 16, "max_length": 128,
                  "max_steps": steps, "save_every_steps": 0, "log_every_steps": 5, "seed": 1, "warmup_ratio": 0.0}
        train(config, model_path, rows, {}, data.parent / "finetune", logging.getLogger("test_ioi"))
        model, tokenizer = load_model(data.parent / "finetune" / "model")
        self.assertEqual(model.get_input_embeddings().weight.shape[0], len(load_tokenizer(model_path)))  # none added
        card = json.loads((data / "card.json").read_text())
        names = {tokenizer(" " + n, add_special_tokens=False)["input_ids"][0]
                 for n in card["names"]["train"] + card["names"]["test"]}
        tops = []
        for row in read_records(data / "test/3obj.jsonl")[:8]:
            ids = tokenizer(prompt_text(tokenizer, row["messages"]), add_special_tokens=False)["input_ids"] \
                if tokenizer.chat_template else \
                [tokenizer.bos_token_id] + tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                tops.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        return tops, names, set(stop_token_ids(model, tokenizer))

    def test_raw_text_on_a_gpt2_style_model(self):
        with tempfile.TemporaryDirectory() as tmp:
            first_names, _ = tables.names()
            model_path = gpt2_style(Path(tmp) / "gpt2-style", first_names[::3])
            tops, names, stops = self.first_tokens(model_path, generate(model_path, Path(tmp) / "run"), 25)
            self.assertTrue(set(tops) <= names and not set(tops) & stops, (tops, stops))


if __name__ == "__main__":
    unittest.main()
