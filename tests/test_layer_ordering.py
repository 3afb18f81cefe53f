"""layer_ordering: which parameters each stage really trains, stage chaining, resume and weight clean-up.

A 4-layer tiny model (so "upper half" is layers 2-3 and the end-exclusive boundary is visible)
trains a few real steps per stage on the small spouses world.
"""
import logging
import random
import tempfile
import unittest
from pathlib import Path

import torch
from safetensors.torch import load_file

from models import ensure_model, resolve_model
from runner.errors import UserError
from runner import config as typed
from runner.jobs.layer_ordering import JOB
from twohop.training.stages import (REPLAY_STAGES, STAGES, LayerOrderingConfig, check_config, layer_range, run_chain,
                                    stage_rows)
from tests.fixtures.train_small import small_data

LOG = logging.getLogger("test_layer_ordering")


def weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def changed(before: dict, after: dict) -> set:
    return {name for name in before if not torch.equal(before[name], after[name])}


def layers_of(names) -> set:
    return {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}


class LayerOrderingTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        w = Path(cls.tmp.name) / "w"
        cls.data = small_data(w)
        cls.model = resolve_model("tiny-h128-l4", w / "transformers")
        ensure_model(cls.model)
        config = JOB.subjobs[0].default_config(cls.model)
        config.update(max_steps=2, batch_size=8, save_every_steps=0, eval_subsample=16, stages=STAGES[:3],
                      evaluation={**config["evaluation"], "max_rows": 4, "memorisation_rows": 4, "bootstrap": 20,
                                  "cot_max_new_tokens": 16})
        cls.config = config

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def chain(self, name: str, selective: bool, **overrides) -> tuple:
        run_dir = Path(self.tmp.name) / name
        return run_chain(self.model.path, self.data, {**self.config, **overrides}, selective, 1, run_dir, LOG), run_dir

    def test_selective_stages_train_only_their_half_and_all_trains_everything(self):
        records, run_dir = self.chain("selective", selective=True)
        start = weights(self.model.path)
        stages = [weights(run_dir / f"stage_{k}_{s['name']}" / "model") for k, s in enumerate(STAGES[:3], start=1)]
        self.assertEqual([r["layer_range"] for r in records], ["2-4", "0-2", "all"])

        upper = changed(start, stages[0])  # B facts: layers 2 and 3 only, the rest bit-identical
        self.assertEqual(layers_of(upper), {2, 3})
        self.assertTrue(all(n.startswith(("model.layers.2.", "model.layers.3.")) for n in upper), upper)
        lower = changed(stages[0], stages[1])  # A facts: layers 0 and 1; layer 2 (the range's end) untouched
        self.assertEqual(layers_of(lower), {0, 1})
        self.assertTrue(all(n.startswith(("model.layers.0.", "model.layers.1.")) for n in lower), lower)
        everything = changed(stages[1], stages[2])  # two-hop: every layer and the embeddings
        self.assertEqual(layers_of(everything), {0, 1, 2, 3})
        self.assertIn("model.embed_tokens.weight", everything)
        self.assertLess(records[0]["trainable_parameters"], records[2]["trainable_parameters"])

        for record in records:  # every stage was evaluated and its figures kept
            self.assertIn("acc_a", record["metrics"])
            self.assertIn("acc_2hop_nocot", record["metrics"])
            self.assertIn("loss_gap", record["metrics"])
        self.assertTrue((run_dir / "stage_3_two_hop/eval/results.json").is_file())

        all_records, all_dir = self.chain("all", selective=False, stages=STAGES[:2])
        previous = start
        for k, stage in enumerate(STAGES[:2], start=1):
            current = weights(all_dir / f"stage_{k}_{stage['name']}" / "model")
            self.assertEqual(layers_of(changed(previous, current)), {0, 1, 2, 3}, stage["name"])
            self.assertIn("model.embed_tokens.weight", changed(previous, current))
            previous = current
        self.assertEqual({r["layer_range"] for r in all_records}, {"all"})

    def test_resumed_chain_continues_at_the_first_unfinished_stage(self):
        records, run_dir = self.chain("resume", selective=True)
        first = run_dir / "stage_1_b_facts/model/model.safetensors"
        stamp = first.stat().st_mtime_ns
        third = run_dir / "stage_3_two_hop"
        (third / "stage.json").unlink()  # as if killed during stage 3's evaluation
        again, _ = self.chain("resume", selective=True)
        self.assertEqual(first.stat().st_mtime_ns, stamp)  # stage 1 was not retrained
        self.assertEqual([r["stage"] for r in again], [1, 2, 3])
        self.assertEqual(again[:2], records[:2])
        self.assertTrue((third / "stage.json").is_file())

    def test_finished_stages_weights_can_be_deleted(self):
        _, run_dir = self.chain("drop", selective=True, delete_finished_weights=True)
        self.assertFalse((run_dir / "stage_1_b_facts/model").exists())
        self.assertFalse((run_dir / "stage_2_a_facts/model").exists())
        self.assertTrue((run_dir / "stage_3_two_hop/model/model.safetensors").is_file())

    def test_replay_stages_train_their_rounds_earlier_facts_and_are_the_replay_subjobs_default(self):
        def count(stage):
            return len(stage_rows(self.data, stage["train"], 1.0, random.Random(0)))
        b, a, two_hop = (count(stage) for stage in STAGES[:3])
        self.assertEqual([count(stage) for stage in REPLAY_STAGES], [b, a + b, two_hop + a + b] * 2)
        self.assertEqual([s["layers"] for s in REPLAY_STAGES], [s["layers"] for s in STAGES])
        self.assertEqual([s["lr_scale"] for s in REPLAY_STAGES], [s["lr_scale"] for s in STAGES])
        self.assertEqual(REPLAY_STAGES[4]["name"], "a_facts_b_replay_again")
        by_name = {subjob.name: subjob for subjob in JOB.subjobs}
        for mode in ("selective", "all"):
            self.assertEqual(by_name[f"{mode}_replay"].default_config(self.model)["stages"], REPLAY_STAGES)
            self.assertEqual(by_name[mode].default_config(self.model)["stages"], STAGES)
        self.assertEqual(by_name["compare_replay"].requires, ("layer_ordering_selective_replay", "layer_ordering_all_replay"))

    def test_ranges_and_bad_stages(self):
        self.assertEqual(layer_range("upper", 32, -1), "16-32")
        self.assertEqual(layer_range("lower", 32, 10), "0-10")
        self.assertEqual(layer_range("3-7", 32, -1), "3-7")
        with self.assertRaisesRegex(UserError, "split_layer 4"):
            layer_range("upper", 4, 4)
        with self.assertRaisesRegex(UserError, r"stages\[1\].layers 'middle'"):
            check_config({**self.config, "stages": [STAGES[0], {**STAGES[1], "layers": "middle"}]})
        with self.assertRaisesRegex(UserError, r"split_layer 0: expected -1"):
            check_config({**self.config, "split_layer": 0})
        with self.assertRaisesRegex(UserError, r"stages\[0\]: unknown key\(s\) colour"):
            typed.assign(dict(self.config), LayerOrderingConfig, "stages", [{"name": "x", "colour": "red"}], "--set")
        with self.assertRaisesRegex(UserError, r"stages\[0\]: needs a name and training files"):
            check_config({**self.config, "stages": [{**STAGES[0], "train": []}]})


if __name__ == "__main__":
    unittest.main()
