"""Every supported family for real, on CPU: a random-init model of each (tests/fixtures/tiny_families.py,
hidden 32, 2 layers, the embedded tokenizer at 1024 tokens and its chat template) goes through a few
steps of full fine-tuning and of LoRA, is loaded back as every job loads it, generates and is graded,
has its hidden states saved, and passes the intervention parity check.

One test class per family is generated from the table of configurations; each trains its two models once
(setUpClass) and the tests check what came out of them.
"""
import logging
import tempfile
import unittest
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from models import load_model
from models.families import decoder_layers, family_of, final_norm, input_embeddings, unembed
from runner import config as typed
from tests.fixtures.tiny_families import CONFIGS, build_family, tiny_tokenizer
from twohop.evaluation.generation import generate, prompt_text
from twohop.evaluation.grading import grade
from twohop.interp.hidden_states import HiddenStates, save_hidden_states
from twohop.interp.hooks import Batch, locate, parity_check
from twohop.training.config import AdapterTrainingConfig
from twohop.training.trainer import Trainer

FACTS = [("Ada Hughes-Marsjanska", "Oslo"), ("Bo Lindqvist", "Lima"), ("Thalia Donnelly-Rosenthal", "Rome"),
         ("Ian Okafor-Wright", "Cairo"), ("Mia Castellano", "Dublin"), ("Leo Brandt-Iversen", "Quito")]
TRAINING = dict(lr=1e-2, warmup_ratio=0.0, batch_size=3, max_length=64, max_steps=2, save_every_steps=0,
                log_every_steps=1, seed=1, bf16=False)


def fact_row(e1: str, city: str) -> dict:
    question = f"Where was {e1} born?"
    return {"messages": [{"role": "system", "content": "Answer directly."}, {"role": "user", "content": question},
                         {"role": "assistant", "content": city}],
            "question": question, "answer": city, "answer_intermediate": "", "e1": e1}


ROWS = [fact_row(e1, city) for e1, city in FACTS]


def logits(model, tokenizer, texts) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True)).logits


class FamilyChecks:
    """The checks every family passes; `model_type` is set by each generated class."""
    model_type = ""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        root = Path(cls.tmp.name)
        cls.base = build_family(cls.model_type, tiny_tokenizer(), root / "base")
        cls.trainers = {peft or "full": cls.train(root / f"run_{peft or 'full'}", peft=peft) for peft in ("", "lora")}
        cls.prompts = [prompt_text(tiny_tokenizer(), row["messages"]) for row in ROWS]

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    @classmethod
    def train(cls, run_dir: Path, **overrides) -> Trainer:
        config = {**typed.defaults(AdapterTrainingConfig), **TRAINING, **overrides}
        run_dir.mkdir()
        trainer = Trainer(config, cls.base, ROWS, {"facts": ROWS[:3]}, run_dir, logging.getLogger("test_families"))
        trainer.run()
        trainer.saved.eval()
        return trainer

    def loaded(self, kind: str, **loading):
        return load_model(self.trainers[kind].run_dir / "model", **loading)

    def test_training_saves_what_it_trained_and_every_job_loads_it(self):
        base_logits = logits(*load_model(self.base), self.prompts)
        for kind, trainer in self.trainers.items():
            with self.subTest(kind):
                self.assertTrue(np.isfinite(trainer.last_loss))
                model, tokenizer = self.loaded(kind)
                self.assertEqual(tokenizer(self.prompts[0]).input_ids, tiny_tokenizer()(self.prompts[0]).input_ids)
                trained = logits(trainer.saved, tokenizer, self.prompts)
                torch.testing.assert_close(logits(model, tokenizer, self.prompts), trained, atol=1e-5, rtol=1e-5)
                self.assertGreater((trained - base_logits).abs().max().item(), 1e-3, "training changed nothing")

    def test_lora_adapts_the_family_targets_only(self):
        adapter = load_file(self.trainers["lora"].run_dir / "model" / "adapter_model.safetensors")
        adapted = {name.split(".")[-3] for name in adapter}
        self.assertEqual(adapted, set(family_of(self.trainers["lora"].model.config).lora_targets))
        trainable = [name for name, p in self.trainers["lora"].model.named_parameters() if p.requires_grad]
        self.assertTrue(trainable and all("lora_" in name for name in trainable), trainable)

    def test_generation_is_batch_independent_follows_the_logits_and_is_graded(self):
        model, tokenizer = self.loaded("full")
        replies = generate(model, tokenizer, self.prompts, max_new_tokens=4, batch_size=4)
        self.assertEqual(replies, [generate(model, tokenizer, [p], max_new_tokens=4)[0] for p in self.prompts])
        first = generate(model, tokenizer, self.prompts[:1], max_new_tokens=1)[0]
        top = logits(model, tokenizer, self.prompts[:1])[0, -1].argmax()
        self.assertEqual(first, tokenizer.decode(top, skip_special_tokens=True).strip())
        grades = [grade(row, reply, "nocot") for row, reply in zip(ROWS, replies)]
        self.assertTrue(all(isinstance(g["correct"], bool) and g["rule"] for g in grades), grades)
        self.assertTrue(grade(ROWS[0], f"{ROWS[0]['answer']}.", "nocot")["correct"])

    def test_hidden_states_are_numbered_as_the_model_computes_them(self):
        for kind in self.trainers:
            with self.subTest(kind):
                model, tokenizer = self.loaded(kind)
                folder = Path(self.tmp.name) / f"states_{kind}"
                save_hidden_states(model, tokenizer, [{"id": i, "prompts": [p]} for i, p in enumerate(self.prompts)],
                                   folder, batch_size=4)
                saved = HiddenStates(folder)
                layers = len(decoder_layers(model))
                self.assertEqual(saved.metadata["layers"], layers + 1)
                states = torch.tensor(np.stack([saved.layer(i) for i in range(layers + 1)]))
                for row, prompt in enumerate(self.prompts):
                    self.assert_states_match(model, tokenizer, prompt, states[:, row])

    def assert_states_match(self, model, tokenizer, prompt: str, states: torch.Tensor):
        """`states` ([layers + 1, hidden], the prompt's last token): 0..L-1 as the model's own hidden states
        (0 = what enters decoder layer 1), L through the final norm and unembedding as its logits."""
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            output = model(ids, output_hidden_states=True)
            embedded = input_embeddings(model)(ids)[0, -1]
            lens = unembed(model, final_norm(model)(states[-1]))
        expected = torch.stack([h[0, -1] for h in output.hidden_states[:-1]])
        torch.testing.assert_close(states[:-1], expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(lens, output.logits[0, -1], atol=1e-4, rtol=1e-4)
        if self.model_type == "gpt2":  # its position embeddings are added after the token embedding module
            self.assertGreater((states[0] - embedded).abs().max().item(), 1e-3)

    def test_intervention_parity(self):
        for kind in self.trainers:
            with self.subTest(kind):
                model, tokenizer = self.loaded(kind, attn_implementation="eager")
                found = [locate(tokenizer, prompt, row["question"], row["e1"])
                         for prompt, row in zip(self.prompts, ROWS)]
                batch = Batch.left_padded([ids for ids, _ in found], tokenizer.pad_token_id)
                report = parity_check(model, batch, knockout_layers=(1, 2))
                self.assertLess(max(report.values()), 1e-4, report)


def family_test(model_type: str) -> type:
    name = "".join(part.capitalize() for part in model_type.split("_")) + "Test"
    return type(name, (FamilyChecks, unittest.TestCase), {"model_type": model_type,
                                                           "__doc__": f"A random-init {model_type} model for real."})


globals().update({case.__name__: case for case in map(family_test, CONFIGS)})


if __name__ == "__main__":
    unittest.main()
