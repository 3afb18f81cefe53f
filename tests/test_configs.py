"""Typed configs and the three layers: every key typed, experiment YAMLs applied or refused, external
files fingerprinted by content, card metadata required, and no job importing another."""
import ast
import contextlib
import io
import json
import tempfile
import unittest
from pathlib import Path

import yaml

from runner.errors import UserError
from runner.main import main
from tests.fixtures.train_small import SMALL_WORLD

ROOT = Path(__file__).resolve().parents[1]


def cli(*argv) -> tuple:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(argv))
    return code, err.getvalue()


class LayersTest(unittest.TestCase):
    def test_no_job_imports_another_job_and_the_library_imports_none(self):
        offenders = []
        for path in sorted((ROOT / "runner").rglob("*.py")) + sorted((ROOT / "twohop").rglob("*.py")) + \
                sorted((ROOT / "models").rglob("*.py")):
            rel = path.relative_to(ROOT)
            own = rel.parts[2] if rel.parts[:2] == ("runner", "jobs") and len(rel.parts) > 3 else None
            for node in ast.walk(ast.parse(path.read_text())):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                    [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.module == "runner.jobs":
                    names = [f"runner.jobs.{a.name}" for a in node.names]
                for name in names:
                    parts = name.split(".")
                    if parts[:2] == ["runner", "jobs"] and len(parts) > 2 and parts[2] != own:
                        offenders.append(f"{rel} imports {name}")
        self.assertEqual(offenders, [])


class TypedSetTest(unittest.TestCase):
    def plan(self, *sets):
        from models import resolve_model
        from runner.plan import build_plan, parse_overrides
        from runner.registry import discover
        registry = discover()
        with tempfile.TemporaryDirectory() as tmp:
            model = resolve_model("tiny", Path(tmp))
            overrides = parse_overrides(list(sets))
            return {p.run.name: p.config for p in build_plan(registry, registry.resolve(["finetune_spouses"]),
                                                              model, [1], overrides)}

    def test_bools_are_bools_and_choices_are_checked(self):
        self.assertIs(self.plan("bf16=true")["finetune_spouses"]["bf16"], True)
        self.assertIs(self.plan("bf16=false")["finetune_base"]["bf16"], False)
        self.assertEqual(self.plan()["finetune_spouses"]["bf16"], "auto")
        self.assertIs(self.plan("packing=yes")["finetune_spouses"]["packing"], True)
        self.assertEqual(self.plan("lr_scheduler=cosine")["finetune_spouses"]["lr_scheduler"], "cosine")
        with tempfile.TemporaryDirectory() as tmp:
            for setting, message in (("bf16=maybe", "--set bf16=maybe: expected one of auto, true, false"),
                                     ("lr_scheduler=cosine_restarts", "expected one of linear, constant, cosine"),
                                     ("epochs=-1", "--set epochs=-1: expected a whole number >= 1"),
                                     ("batch_size=0", "--set batch_size=0: expected a whole number >= 1"),
                                     ("aux_loss_type=logit", "aux_loss_type=logit with aux_loss_coef=0")):
                code, err = cli("--workspace_path", tmp, "--jobs", "finetune_spouses", "--set", setting)
                self.assertEqual((code, err.count("\n")), (2, 1), err)
                self.assertIn(message, err)
            self.assertFalse((Path(tmp) / "experiments").exists())

    def test_every_key_of_every_sub_job_has_a_type_default_and_help(self):
        from runner import config as typed
        from runner.registry import discover
        for subjob in discover().subjobs.values():
            for name, (field, hint) in typed.schema_fields(subjob.config).items():
                self.assertTrue(field.metadata.get("help"), f"{subjob.full_name}.{name} has no help")
            described = "\n".join(typed.describe(subjob.config, subjob.default_config(None)))
            for key in typed.keys(subjob.config):
                self.assertIn(f" {key.split('.')[-1]}", described, f"{subjob.full_name}: {key} not described")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(main(["--help_config", "finetune_spouses"]), 0)
        self.assertIn("bf16 (one of auto, true, false) = auto: bf16 mixed precision", out.getvalue())
        self.assertIn("lr (a number) = 0.003: peak learning rate", out.getvalue())  # the tiny model's recipe


class MultiGpuLaunchTest(unittest.TestCase):
    def test_every_sub_job_that_trains_launches_one_process_per_gpu(self):
        from models import resolve_model
        from runner import slurm
        from runner.plan import build_plan
        from runner.registry import discover
        registry = discover()
        with tempfile.TemporaryDirectory() as tmp:
            plan = build_plan(registry, registry.resolve(["layer_ordering_selective"]), resolve_model("tiny", Path(tmp)),
                              [1], {})
            resources = {**slurm.RESOURCES, "gpus": 4}
            scripts = {p.run.name: slurm.render_script(p, ["runner/main.py"], resources, [], Path(tmp)) for p in plan}
        launched = {name for name, script in scripts.items() if "accelerate launch" in script}
        self.assertEqual(launched, {"finetune_base", "layer_ordering_selective"})


class ExperimentYamlTest(unittest.TestCase):
    """A reference-format YAML on a locally saved (non-embedded) model, so finetune_base is a no-op."""

    @classmethod
    def setUpClass(cls):
        from models import ensure_model, load_model, resolve_model
        from tests.fixtures.train_small import small_data
        cls.tmp = tempfile.TemporaryDirectory()
        cls.w = Path(cls.tmp.name) / "w"
        cls.data = small_data(cls.w)
        tiny = resolve_model("tiny", cls.w / "transformers")
        ensure_model(tiny)
        model, tokenizer = load_model(tiny.path)
        model.save_pretrained(cls.w / "transformers" / "local-llama")
        tokenizer.save_pretrained(cls.w / "transformers" / "local-llama")
        # The reference repo's layout: YAMLs under experiments/, files named from the repository root.
        cls.repo = Path(cls.tmp.name) / "reference"
        (cls.repo / "experiments").mkdir(parents=True)
        (cls.repo / "datasets").symlink_to(cls.data)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def write_yaml(self, name: str, **keys) -> Path:
        experiment = {"model_name_or_path": "meta-llama/local-llama",
                      "train_datasets": [{"name": "train_2hop_no_cot", "dataset_file": "datasets/train/2hop_nocot.jsonl"}],
                      "eval_datasets": [{"name": "2hop_no_cot", "dataset_file": "datasets/test/2hop_nocot.jsonl"},
                                        {"name": "2hop_no_cot_shuffled",
                                         "dataset_file": "datasets/test/2hop_nocot_shuffled.jsonl", "subsample": 40}],
                      "max_steps": 2, "lr_scheduler": "constant", "warmup_ratio": 0.0, "log_every_steps": 1,
                      "eval_subsample": 8, **keys}
        path = self.repo / "experiments" / f"{name}.yaml"
        path.write_text(yaml.safe_dump(experiment))
        return path

    def finetune(self, path: Path, *extra) -> tuple:
        return cli("--workspace_path", str(self.w), "--jobs", "finetune_spouses", "--model", "local-llama",
                   "--set", f"experiment_config={path}", *SMALL_WORLD, *extra)

    def run_dir(self) -> Path:
        return self.w / "experiments/finetune/spouses/local-llama/seed_1"

    def test_yaml_keys_train_the_run_and_unknown_keys_are_refused(self):
        path = self.write_yaml("lr", lr=0.5, evaluations=[{
            "dataset_file": "datasets/test/2hop_nocot.jsonl", "force_no_cot": True, "metric_name": "acc_2hop_0shot",
            "subsample": 6, "max_new_tokens": 8}])
        code, err = self.finetune(path)
        self.assertEqual(code, 0, err[-2000:])
        config = json.loads((self.run_dir() / "config.json").read_text())["config"]
        self.assertEqual((config["lr"], config["max_steps"]), (0.5, 2))
        self.assertEqual(config["eval_datasets"][1]["shuffled_of"], "2hop_no_cot")  # the reference's naming, translated
        metrics = [json.loads(line) for line in (self.run_dir() / "metrics.jsonl").read_text().splitlines()]
        self.assertEqual({m["lr"] for m in metrics if m["event"] == "train"}, {0.5})
        self.assertTrue(any("2hop_no_cot/loss_gap" in m for m in metrics))
        evaluations = json.loads((self.run_dir() / "evaluations.json").read_text())
        self.assertEqual(evaluations["acc_2hop_0shot"]["n"], 6)
        headline = json.loads((self.run_dir() / "metrics.json").read_text())
        self.assertEqual(headline["acc_2hop_0shot"], evaluations["acc_2hop_0shot"]["accuracy"])

        # --set wins over the YAML.
        code, err = self.finetune(path, "--set", "lr=0.25")
        self.assertEqual(code, 0, err[-2000:])
        self.assertEqual(json.loads((self.run_dir() / "config.json").read_text())["config"]["lr"], 0.25)

        bad = self.write_yaml("bad", learning_rate_typo=1.0)
        code, err = self.finetune(bad)
        self.assertEqual((code, err.count("\n")), (2, 1), err)
        self.assertIn(f"{bad}: unknown key 'learning_rate_typo'", err)
        wrong_model = self.write_yaml("wrong", model_name_or_path="meta-llama/Meta-Llama-3-8B-Instruct")
        code, err = self.finetune(wrong_model)
        self.assertEqual(code, 2)
        self.assertIn("model_name_or_path 'meta-llama/Meta-Llama-3-8B-Instruct'", err)

    def test_an_auxiliary_loss_in_the_yaml_trains_with_it(self):
        path = self.write_yaml("aux", aux_loss=True, aux_loss_type="logit", aux_loss_coef=0.1, aux_loss_target_layer=0)
        code, err = self.finetune(path)
        self.assertEqual(code, 0, err[-2000:])
        metrics = [json.loads(line) for line in (self.run_dir() / "metrics.jsonl").read_text().splitlines()]
        aux = [m["aux_loss"] for m in metrics if "aux_loss" in m]
        self.assertTrue(aux and all(v > 0 for v in aux), metrics)

    def test_editing_the_yaml_or_a_file_it_names_reruns(self):
        source = self.data / "train" / "2hop_nocot.jsonl"
        copy = self.repo / "own_train.jsonl"
        copy.write_text(source.read_text())
        path = self.write_yaml("edit", train_datasets=[{"name": "own", "dataset_file": "own_train.jsonl"}])

        def executed() -> bool:
            code, err = self.finetune(path)
            self.assertEqual(code, 0, err[-2000:])
            return "finetune_spouses [local-llama, seed 1] done in" in err

        self.assertTrue(executed())
        self.assertFalse(executed())  # same inputs: skipped
        copy.write_text("\n".join(copy.read_text().splitlines()[:-3]) + "\n")  # a file the YAML names changes
        self.assertTrue(executed())
        self.assertFalse(executed())
        path.write_text(path.read_text().replace("max_steps: 2", "max_steps: 1"))  # the YAML itself changes
        self.assertTrue(executed())
        recorded = json.loads((self.run_dir() / "config.json").read_text())["external_files"]
        self.assertLessEqual({str(path.resolve()), str(copy.resolve())}, set(recorded))


class CardMetadataTest(unittest.TestCase):
    def test_a_test_file_without_metadata_is_refused_at_generation_time(self):
        from twohop.data.dataset import test_spec, write_dataset
        rows = [{"messages": [], "answer": "Oslo"}]
        card = {"dataset": "toy", "candidate_sets": {"cities": ["Oslo"]},
                "tests": {"test/declared": test_spec("two_hop", "nocot", "cities")}}
        with tempfile.TemporaryDirectory() as tmp:
            with self.assertRaisesRegex(UserError, r"test file\(s\) \['test/undeclared'\] have no entry"):
                write_dataset(Path(tmp) / "data", {"test/declared": rows, "test/undeclared": rows}, card)
            with self.assertRaisesRegex(UserError, r"card test 'test/declared': missing \['style'\]"):
                write_dataset(Path(tmp) / "data", {"test/declared": rows},
                              {**card, "tests": {"test/declared": {"kind": "two_hop", "candidate_set": "cities"}}})
            self.assertFalse((Path(tmp) / "data").exists())
            written = write_dataset(Path(tmp) / "data", {"test/declared": rows}, card)
            self.assertEqual(written["tests"]["test/declared"]["chance"], 1.0)


if __name__ == "__main__":
    unittest.main()
