"""Skill drills (`twohop.data.drills`) and the base's optional drill warm-up (`twohop.training.drills`):
rows whose lookups can be answered from their own prompt, the lookup drill as base rows, training that
scoring does not disturb, a warm-up saved and reused, and `finetune_base` running it through the runner."""
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path

import torch
from safetensors.torch import load_file

from models import load_model
from models.tiny import build_tiny_model
from runner.errors import UserError
from tests.fixtures.train_small import SMALL_WORLD
from twohop.data import base_corpus, tables
from twohop.data.drills import COPY_KINDS, KEY_VALUE_KINDS, MAX_DISTRACTORS, drill_rows, lookup_records, word_pools
from twohop.data.records import record
from twohop.training.batching import pack_apart
from twohop.training.drills import DrillSettings, forward, interleaved_drill, parse_phases, train_drills, warm_up

ROOT = Path(__file__).resolve().parents[1]


class DrillTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.model_path = build_tiny_model("tiny", Path(cls.tmp.name) / "tiny", seed=0)
        cls.tokenizer = load_model(cls.model_path)[1]
        cls.pools = word_pools(cls.tokenizer)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_every_lookup_target_stands_earlier_in_its_own_row(self):
        """A lookup is answerable from the prompt: the asked value's first token was stated before it, and
        each row asks exactly the questions it was told to."""
        import random
        for kind, lookup in KEY_VALUE_KINDS.items():
            questions = 1 if lookup.layout else 2
            rows = drill_rows(self.tokenizer, self.pools, kind, random.Random(kind), 8, (12, 36), questions)
            self.assertEqual(len(rows), 8, kind)
            for ids, mask in rows:
                positions = [i for i, target in enumerate(mask) if target]
                self.assertEqual((len(positions), len(mask)), (questions, len(ids)), kind)
                for position in positions:
                    self.assertIn(ids[position], ids[:position], kind)

    def test_copy_rows_repeat_their_list_and_score_the_copy(self):
        import random
        for kind in COPY_KINDS:
            rows = drill_rows(self.tokenizer, self.pools, kind, random.Random(kind), 4, (12, 36))
            width = len(rows[0][0]) // 2
            for ids, mask in rows:
                self.assertEqual((len(ids), ids[:width]), (2 * width, ids[width:]), kind)
                scored = [i for i, target in enumerate(mask) if target]
                self.assertEqual(scored, list(range(width + 1, 2 * width)), kind)

    def test_two_hop_rows_are_the_study_prompt_and_score_the_reply(self):
        """The two-hop kinds: the study's in-context prompt over 1-11 couples, the asked person's spouse and the
        spouse's city stated in it; no-CoT scores the city's token, CoT every token of the chain."""
        import random
        eot = self.tokenizer.convert_tokens_to_ids("<|eot|>")
        for kind, style in (("chat_two_hop", "nocot"), ("chat_two_hop_cot", "cot")):
            couples = set()
            for ids, mask in drill_rows(self.tokenizer, self.pools, kind, random.Random(kind), 16, (12, 36)):
                text = self.tokenizer.decode(ids)
                user = text.split("<|user|>")[1].split("<|eot|>")[0]
                facts = dict(line.removesuffix(".").split("'s spouse is ") for line in user.splitlines() if "'s spouse is" in line)
                born = dict(line.removesuffix(".").split(" was born in ") for line in user.splitlines() if " was born in" in line)
                couples.add(len(facts))
                asked = [e1 for e1 in facts if e1 in user.split("\n\n", 1)[1]]
                self.assertEqual(len(asked), 1, text)
                scored = self.tokenizer.decode([token for token, target in zip(ids, mask) if target]).strip()
                reply = text.split("<|assistant|>")[1].split("<|eot|>")[0].strip()
                city = born[facts[asked[0]]]
                self.assertEqual(scored, city if style == "nocot" else reply)
                self.assertTrue(reply.endswith(city + ("." if style == "cot" else "")), reply)
                last_target = max(i for i, target in enumerate(mask) if target)
                self.assertEqual(ids[last_target + 1], eot)  # a city is one token
            self.assertTrue(couples <= set(range(1, MAX_DISTRACTORS + 2)) and len(couples) > 3, couples)

    def test_pack_apart_places_every_row_once(self):
        """First fit, longest first, at the longest row's width: each row whole with positions from 0, its first
        token and the padding unlabelled, its targets where they were; rows of one length (the copy drills) one a
        sequence, with no padding."""
        rows = [([7, 8, 9, 10, 11], [0, 0, 1, 1, 0]), ([3, 4, 5], [0, 1, 0]), ([20, 21], [0, 1]), ([30], [0]),
                ([40, 41, 42, 43, 44], [0, 0, 0, 0, 1])]
        batch = pack_apart(rows, pad_id=0)
        self.assertEqual(batch["input_ids"].tolist(), [[7, 8, 9, 10, 11], [40, 41, 42, 43, 44], [3, 4, 5, 20, 21],
                                                       [30, 0, 0, 0, 0]])
        self.assertEqual(batch["position_ids"].tolist(), [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [0, 1, 2, 0, 1],
                                                          [0, 0, 1, 2, 3]])
        self.assertEqual(batch["labels"].tolist(), [[-100, 8, 9, 10, 11], [-100, 41, 42, 43, 44],
                                                    [-100, 4, 5, -100, 21], [-100] * 5])
        self.assertEqual(batch["targets"].int().tolist(), [[0, 0, 1, 1, 0], [0, 0, 0, 0, 1], [0, 1, 0, 0, 1],
                                                           [0] * 5])
        same = pack_apart([([1, 2, 3], [0, 0, 1])] * 4, pad_id=0)
        self.assertEqual(same["input_ids"].tolist(), [[1, 2, 3]] * 4)
        self.assertEqual(same["position_ids"].tolist(), [[0, 1, 2]] * 4)

    def test_packed_rows_see_only_themselves(self):
        """Two-hop rows of 1-11 couples packed several to a sequence: each row's logits are its logits alone
        (no row attends to another), and the loss is the mean over every row's own next-token losses."""
        import random
        model = load_model(self.model_path, dtype=torch.float32)[0]
        rows = drill_rows(self.tokenizer, self.pools, "chat_two_hop_cot", random.Random(1), 12, (12, 36))
        batch = pack_apart(rows, self.tokenizer.pad_token_id)
        self.assertLess(len(batch["input_ids"]), len(rows))  # rows did share sequences
        with torch.no_grad():
            packed = forward(model, batch)
            alone = [model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])) for ids, _ in rows]
        seen = []
        for sequence, starts in enumerate(batch["position_ids"] == 0):
            bounds = [*starts.nonzero().flatten().tolist(), batch["input_ids"].shape[1]]
            for start, end in zip(bounds, bounds[1:]):
                ids = batch["input_ids"][sequence, start:end].tolist()
                if set(ids) == {self.tokenizer.pad_token_id}:
                    continue
                row = next(i for i, (row_ids, _) in enumerate(rows) if row_ids == ids)
                torch.testing.assert_close(packed.logits[sequence, start:end], alone[row].logits[0],
                                           atol=1e-4, rtol=1e-4)
                self.assertEqual(batch["targets"][sequence, start:end].tolist(), rows[row][1])
                seen.append(row)
        self.assertEqual(sorted(seen), list(range(len(rows))))
        tokens = [len(ids) - 1 for ids, _ in rows]
        mean = sum(out.loss.item() * n for out, n in zip(alone, tokens)) / sum(tokens)
        self.assertAlmostEqual(packed.loss.item(), mean, places=4)

    def test_lookup_records_ask_a_spouse_stated_in_their_prompt(self):
        import random
        rows = lookup_records(20, random.Random(0))
        for row in rows:
            system, user, reply = row["messages"]
            user = user["content"]
            asked = user.rsplit("Who is ", 1)[1].removesuffix("'s spouse?")
            self.assertIn(f"\n{asked}'s spouse is {reply['content']}.\n", "\n" + user + "\n")
            self.assertEqual(user.count("'s spouse is "), 6)
            self.assertEqual(user.count(" was born in "), 6)
            self.assertEqual((row["answer"], system["content"]), (reply["content"], tables.templates("system_prompts")["nocot"]))
        self.assertGreater(len({row["answer"] for row in rows}), 15)  # fresh people each row

    def test_base_corpus_lookup_rows_add_rows_and_change_nothing_else(self):
        with tempfile.TemporaryDirectory() as tmp:
            natural = Path(tmp) / "natural.jsonl"
            natural.write_text(json.dumps(record("What is the capital of Xland?", "Xcity", "Xcity")) + "\n")
            config = {"data_seed": 0, "base_people": 6, "base_paraphrases": 1, "in_context_rounds": 1,
                      "in_context_per_round": 2, "copy_rows": 3, "lookup_rows": 0, "in_context_people": "base"}
            plain = [json.dumps(row, sort_keys=True) for row in base_corpus.corpus(natural, config)]
            more = [json.dumps(row, sort_keys=True) for row in base_corpus.corpus(natural, {**config, "lookup_rows": 4})]
        self.assertEqual(len(more), len(plain) + 4)
        added = sorted(set(more) - set(plain))
        self.assertEqual(len(added), 4)
        self.assertTrue(all("Who is " in json.loads(row)["question"] for row in added))
        self.assertEqual(sorted(set(more) & set(plain)), sorted(plain))

    def test_fresh_in_context_people_are_none_of_the_base_people(self):
        """in_context_people=fresh swaps the facts-in-the-prompt rows' people for ones the base never learns
        (so memory cannot answer them) and leaves every other row as it was."""
        with tempfile.TemporaryDirectory() as tmp:
            natural = Path(tmp) / "natural.jsonl"
            natural.write_text(json.dumps(record("What is the capital of Xland?", "Xcity", "Xcity")) + "\n")
            config = {"data_seed": 0, "base_people": 6, "base_paraphrases": 1, "in_context_rounds": 2,
                      "in_context_per_round": 3, "copy_rows": 3, "lookup_rows": 0, "in_context_people": "base"}
            plain, fresh = (base_corpus.corpus(natural, {**config, "in_context_people": people}) for people in ("base", "fresh"))
        in_context = lambda rows: [r for r in rows if "n_distractors" in r]
        self.assertEqual(len(in_context(fresh)), len(in_context(plain)))
        base_people = {r[k] for r in in_context(plain) for k in ("e1", "e2")}
        fresh_people = {r[k] for r in in_context(fresh) for k in ("e1", "e2")}
        self.assertFalse(base_people & fresh_people)
        self.assertGreater(len(fresh_people), len(base_people))  # drawn anew for each round and style
        rest = lambda rows: sorted(json.dumps(r, sort_keys=True) for r in rows if "n_distractors" not in r)
        self.assertEqual(rest(fresh), rest(plain))
        for row in in_context(fresh):
            self.assertIn(row["e1"], row["question"])
            self.assertIn(f"{row['e2']} was born in {row['e3']}", row["question"])

    def test_bad_phase_is_one_line_naming_the_key(self):
        for phases, expected in ((["random"], "KIND[+KIND...]:STEPS"), (["random:0"], "positive"),
                                 (["random:5", "kv+nope:3"], "'nope' is not a drill")):
            with self.assertRaises(UserError) as caught:
                parse_phases(phases)
            self.assertIn("drill_phases", str(caught.exception))
            self.assertIn(expected, str(caught.exception))
        self.assertEqual(parse_phases(["random:5", "kv+chat_spouses_born:3"]),
                         [(("random",), 5), (("kv", "chat_spouses_born"), 3)])

    def test_interleaved_drill_adds_a_batch_every_n_steps_kinds_in_turn(self):
        model = load_model(self.model_path, dtype=torch.float32)[0]
        loss = interleaved_drill(self.tokenizer, "random+kv:2", seed=0)
        self.assertIsNone(loss(model, 1))
        self.assertIsNone(loss(model, 3))
        first = loss(model, 0)
        first.backward()
        self.assertGreater(first.item(), 0)
        self.assertTrue(any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()))
        # A step's rows depend on (seed, step) alone: a fresh hook (a resumed run) gives step 0 the same
        # batch after drawing others, and another step another batch.
        again = interleaved_drill(self.tokenizer, "random+kv:2", seed=0)
        again(model, 4)
        self.assertAlmostEqual(again(model, 0).item(), first.item(), places=5)
        self.assertNotAlmostEqual(again(model, 4).item(), first.item(), places=3)
        with self.assertRaises(UserError) as caught:
            interleaved_drill(self.tokenizer, "random:0", seed=0)
        self.assertIn("drill_interleave: 'random:0' is not KIND[+KIND...]:EVERY", str(caught.exception))

    def train(self, watched=()) -> tuple:
        torch.manual_seed(0)
        model, tokenizer = load_model(self.model_path, dtype=torch.float32)
        reports = []
        train_drills(model, tokenizer, parse_phases(["random:2", "kv_spouses_born+chat_spouses_born:4"]),
                     DrillSettings(batch_size=4, every=2), seed=3, report=reports.append, watched=watched)
        return reports, model.state_dict()

    def test_held_out_scoring_leaves_the_training_unchanged(self):
        """A mixed phase's kinds and watched kinds are scored on their own stream: the trained weights and
        the training reports are those of a run that scores nothing extra."""
        plain, plain_weights = self.train()
        watched, watched_weights = self.train(watched=("prompt_spouses_born",))
        self.assertEqual([r["data"] for r in plain], ["random", "kv_spouses_born", "kv_spouses_born", "kv_spouses_born"])
        self.assertEqual(set(plain[1]["held_out"]), {"kv_spouses_born", "chat_spouses_born"})
        self.assertNotIn("held_out", plain[0])  # a one-kind phase, nothing watched
        self.assertEqual(set(watched[1]["held_out"]), {"kv_spouses_born", "chat_spouses_born", "prompt_spouses_born"})
        strip = lambda reports: [{k: v for k, v in r.items() if k not in ("held_out", "seconds")} for r in reports]
        self.assertEqual(strip(plain), strip(watched))  # the same batches: another stream moves these losses
        # Not bit for bit: in about one process in eight the extra scoring's allocations shift CPU float
        # reductions, and six Adam steps carry that to ~5e-4 in the attention weights; another batch stream
        # (seed 4) moves every tensor by more than 2e-3, up to 1.2e-2 (both measured).
        for name, tensor in plain_weights.items():
            torch.testing.assert_close(tensor, watched_weights[name], atol=2e-3, rtol=0, msg=name)

    def test_warm_up_trains_saves_and_is_reused(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "warmup"
            log = logging.getLogger("test_drills")
            folder = warm_up(self.model_path, ["random:3"], DrillSettings(), 0, out, log)
            self.assertEqual(folder, out / "model")
            before, after = load_file(self.model_path / "model.safetensors"), load_file(folder / "model.safetensors")
            self.assertTrue(any(not torch.equal(before[k], after[k]) for k in before), "the drills changed no weight")
            reports = [json.loads(line) for line in (out / "drills.jsonl").read_text().splitlines()]
            self.assertEqual([r["step"] for r in reports], [0])  # reported every 50 steps; the run has 3
            self.assertTrue((folder / "tokenizer.json").is_file())
            written = (folder / "model.safetensors").stat().st_mtime_ns
            with self.assertLogs(log, "INFO") as logged:
                self.assertEqual(warm_up(self.model_path, ["random:3"], DrillSettings(), 0, out, log), folder)
            self.assertIn("already done", logged.output[0])
            self.assertEqual((folder / "model.safetensors").stat().st_mtime_ns, written)


    def test_a_killed_warm_up_resumes_as_if_never_stopped(self):
        """A warm-up process killed (SIGKILL) after a checkpoint resumes from it: the same weights and the same
        reports as a run never stopped, and its checkpoints are gone once the model is saved."""
        warm = ("import logging, sys; from pathlib import Path; from twohop.training.drills import DrillSettings, "
                "warm_up; logging.basicConfig(level=logging.INFO); "
                f"warm_up(Path({str(self.model_path)!r}), ['random:60', 'kv_spouses_born:60'], "
                "DrillSettings(batch_size=4, every=10, checkpoint_every=20), 0, Path(sys.argv[1]), logging.getLogger())")
        strip = lambda out: [{k: v for k, v in r.items() if k != "seconds"}
                             for r in map(json.loads, (out / "drills.jsonl").read_text().splitlines())]
        with tempfile.TemporaryDirectory() as tmp:
            whole, killed = Path(tmp) / "whole", Path(tmp) / "killed"
            run = lambda out: subprocess.run([sys.executable, "-c", warm, str(out)], cwd=ROOT, check=True, timeout=600,
                                             capture_output=True, text=True)
            run(whole)
            process = subprocess.Popen([sys.executable, "-c", warm, str(killed)], cwd=ROOT, stderr=subprocess.DEVNULL)
            deadline = time.time() + 600
            while not (killed / "checkpoints" / "step_60").is_dir() and process.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            process.kill()
            process.wait()
            self.assertFalse((killed / "model").exists(), "killed too late: the warm-up had finished")
            self.assertRegex(run(killed).stderr, r"resuming the drills at step (60|80|100)")
            self.assertEqual(strip(killed), strip(whole))
            self.assertEqual([r["step"] for r in strip(whole)], list(range(0, 121, 10)))
            resumed, uninterrupted = (load_file(out / "model" / "model.safetensors") for out in (killed, whole))
            for name, tensor in uninterrupted.items():
                self.assertTrue(torch.equal(tensor, resumed[name]), name)
            self.assertFalse((killed / "checkpoints").exists())


@unittest.skipIf(os.environ.get("TWOHOP_SKIP_SLOW") == "1", "slow: trains finetune_base (TWOHOP_SKIP_SLOW=1)")
class BaseWarmUpTest(unittest.TestCase):
    @staticmethod
    def real_model(tmp) -> Path:
        """A saved model passed by path: a real model to the runner (finetune_base does not train it)."""
        return build_tiny_model("tiny", Path(tmp) / "real", seed=0)

    def test_finetune_base_runs_its_drills_first(self):
        """`drill_phases` trains the drills, then the base corpus from the drilled model; a bad phase is
        refused before anything runs."""
        small_base = ["--set", "finetune_base.max_steps=1", "--set", "finetune_base.base_people=20",
                      "--set", "finetune_base.copy_rows=50", "--set", "finetune_base.in_context_per_round=10"]
        with tempfile.TemporaryDirectory() as tmp:
            run = lambda *extra: subprocess.run(
                [sys.executable, "runner/main.py", "--workspace_path", str(Path(tmp) / "w"), "--jobs", "finetune_base",
                 *SMALL_WORLD, *small_base, *extra], cwd=ROOT, capture_output=True, text=True)
            refused = run("--set", "finetune_base.drill_phases=[random:2,copying:2]")
            self.assertNotEqual(refused.returncode, 0)
            self.assertIn("drill_phases: 'copying' is not a drill", refused.stderr)
            self.assertFalse((Path(tmp) / "w" / "experiments" / "finetune").exists())
            real = subprocess.run([sys.executable, "runner/main.py", "--workspace_path", str(Path(tmp) / "w"), "--jobs",
                                   "finetune_base", "--model", str(self.real_model(tmp)),
                                   "--set", "finetune_base.lookup_rows=5", "--dry_run"], cwd=ROOT, capture_output=True, text=True)
            self.assertNotEqual(real.returncode, 0)
            self.assertIn("is a real model, which finetune_base does not train", real.stderr)
            result = run("--set", "finetune_base.drill_phases=[random:2,chat_spouses_born:2]",
                         "--set", "finetune_base.drill_interleave=random:1")
            self.assertEqual(result.returncode, 0, result.stderr[-3000:])
            base = Path(tmp) / "w" / "experiments" / "finetune" / "base" / "tiny-h128-l2"
            self.assertTrue((base / "drills" / "model" / "model.safetensors").is_file())
            self.assertEqual(json.loads((base / "drills" / "drills.jsonl").read_text().splitlines()[0])["data"], "random")
            self.assertIn("drills step 0 (random)", (base / "log.txt").read_text())
            self.assertEqual(json.loads((base / "config.json").read_text())["config"]["drill_phases"],
                             ["random:2", "chat_spouses_born:2"])
            self.assertEqual(json.loads((base / "config.json").read_text())["config"]["drill_interleave"], "random:1")
            self.assertTrue((base / "model" / "model.safetensors").is_file())


if __name__ == "__main__":
    unittest.main()
