"""Bad input, table-driven: every case is a real `python runner/main.py ...` subprocess that must exit 2
with exactly one line on stderr naming the file, key or value at fault, no traceback, and the workspace
exactly as it was (a workspace that did not exist still does not). The checks are made at plan time, so
most cases use --dry_run; the others show that a real invocation stops before writing anything too.

Bad input covered elsewhere, in-process: unknown job names and --set keys (test_runner), badly typed
--set values (test_configs, test_finetune, test_generate_data), an unknown --model (test_models).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
UNWRITABLE = "/proc/1"  # a folder nobody may create anything in, root included (permission bits do not stop root)


@dataclass
class Case:
    name: str
    args: list  # after `--workspace_path AT`; {fx} is the fixtures folder
    expect: str  # in the one stderr line: the file, key or value at fault
    at: str = "{w}"  # --workspace_path: {w} is the case's own workspace, {fx} the fixtures, {root} the project
    workspace: str = "absent"  # a key of WORKSPACES: what {w} holds before the run
    dry_run: bool = True
    project: str = ""  # a key of PROJECT_EDITS: run a copy of the project with that edit of its shipped data


def case(name, jobs, expect, *more, **options) -> Case:
    return Case(name, ["--jobs", jobs, *more], expect, **options)


def model_case(name, model, expect, **options) -> Case:
    return case(name, "in_context_nocot", expect, "--model", model, **options)


def finetune_case(name, expect, *sets, **options) -> Case:
    return case(name, "finetune_spouses", expect, *[arg for s in sets for arg in ("--set", s)], **options)


def yaml_case(name, yaml_name, expect, **options) -> Case:
    return finetune_case(name, expect, f"experiment_config={{fx}}/files/{yaml_name}", **options)


def prompts_case(name, file, expect, **options) -> Case:
    return case(name, "save_hidden_states_prompts", expect, "--set", f"prompts_file={{fx}}/files/{file}", **options)


def htl_case(name, file, expect, **options) -> Case:
    return case(name, "generate_data_real_facts", expect, "--set", f"hopping_too_late_csv=htl/{file}",
                workspace="with_csvs", **options)


def intervene_case(name, subjob, expect, *sets, **options) -> Case:
    return case(name, f"intervene_{subjob}", expect, *[arg for s in sets for arg in ("--set", s)], **options)


def table_case(name, expect, **options) -> Case:
    return case(name, "generate_data_universities", expect, project=name, **options)


CASES = [
    # --model: a folder that load_model could not load
    model_case("model_without_weights", "{fx}/models/no_weights", "no *.safetensors weights"),
    model_case("model_with_pickled_weights", "{fx}/models/pickle", "pickled weights ['pytorch_model.bin']",
               dry_run=False),
    model_case("model_folder_empty", "{fx}/models/empty", "no config.json"),
    model_case("model_config_not_json", "{fx}/models/config_not_json", "config_not_json/config.json: not valid JSON"),
    model_case("model_config_a_list", "{fx}/models/config_list", "config_list/config.json: expected a JSON object"),
    model_case("model_architecture_unsupported", "{fx}/models/bert", "config.json: model_type 'bert' is not supported"),
    model_case("model_architecture_unknown", "{fx}/models/frobnicator", "model_type 'frobnicator' is not supported"),
    model_case("model_weights_truncated", "{fx}/models/truncated", "truncated/model.safetensors does not read"),
    model_case("model_shard_missing", "{fx}/models/missing_shard", "shard model-00002-of-00002.safetensors"),
    model_case("model_tokenizer_broken", "{fx}/models/tokenizer", "the tokenizer in"),
    model_case("model_empty_name", "", "--model is empty"),
    model_case("tiny_path_holds_a_foreign_folder", "tiny", "tiny-h128-l2 exists but was not built by this project",
               workspace="foreign_tiny", dry_run=False),
    model_case("tiny_path_holds_another_build", "tiny", "holds a different build", workspace="other_build_tiny"),
    model_case("tiny_built_but_truncated", "tiny", "tiny-h128-l2/model.safetensors does not read",
               workspace="truncated_tiny"),
    # --workspace_path: nowhere the runner can or should write
    case("workspace_below_a_file", "generate_data_spouses", "a_file is a file", dry_run=False, at="{fx}/a_file/w"),
    case("workspace_not_writable", "generate_data_spouses", f"{UNWRITABLE} is not writable",
         at=f"{UNWRITABLE}/twohop-w"),
    case("workspace_empty", "generate_data_spouses", "--workspace_path is empty", at=""),
    case("workspace_in_the_checkout", "generate_data_spouses", "is inside the project checkout",
         at="{root}/W-bad-input-test"),
    case("workspace_in_shipped_data", "generate_data_spouses", "is inside the project checkout",
         dry_run=False, at="{root}/datasets/w"),
    # An experiment YAML (--set experiment_config) and the files it names
    yaml_case("train_row_answer_a_number", "answer_number.yaml", "answer_number.jsonl:2: field 'answer' must be text"),
    yaml_case("eval_row_not_json", "eval_bad_json.yaml", "bad_json.jsonl:2: not valid JSON"),
    yaml_case("few_shot_row_without_messages", "few_shots.yaml", "no_messages.jsonl:1: missing field 'messages'"),
    yaml_case("yaml_names_a_missing_file", "missing_file.yaml", "file 'nowhere.jsonl' not found"),
    yaml_case("yaml_not_yaml", "not_yaml.yaml", "not_yaml.yaml: not valid YAML (line"),
    yaml_case("yaml_not_utf8", "latin1.yaml", "latin1.yaml is not UTF-8 text"),
    finetune_case("yaml_a_folder", "is a folder; give a file", "experiment_config={fx}/files"),
    finetune_case("set_train_file_messages_a_string", "messages_string.jsonl:1: field 'messages' must be",
                  "train_datasets=[{name: own, dataset_file: {fx}/files/messages_string.jsonl}]", dry_run=False),
    # Test files one brings (evaluate_twohop_files)
    case("test_files_path_missing", "evaluate_twohop_files", "no_tests does not exist", "--set", "test_files=[{fx}/no_tests]"),
    case("test_file_row_answer_a_number", "evaluate_twohop_files", "answer_number.jsonl:2: field 'answer' must be text",
         "--set", "test_files=[{fx}/files/answer_number.jsonl]"),
    case("test_file_row_bridge_candidates_a_string", "evaluate_twohop_files",
         "candidates_string.jsonl:2: field 'bridge_candidates' must be a list of texts",
         "--set", "test_files=[{fx}/files/candidates_string.jsonl]"),
    case("test_files_finetune_not_a_finetune", "evaluate_twohop_files", "finetune=generate_data_spouses: expected a "
         "finetune sub-job", "--set", "test_files=[{fx}/files/answer_number.jsonl]", "--set", "finetune=generate_data_spouses"),
    # A prompts file (save_hidden_states_prompts)
    prompts_case("prompt_a_number", "prompt_number.jsonl", "prompt_number.jsonl:2: field 'prompt' must be text",
                 dry_run=False),
    prompts_case("prompt_messages_a_string", "prompt_messages_string.jsonl",
                 "prompt_messages_string.jsonl:1: field 'messages' must be"),
    prompts_case("prompt_without_text", "prompt_neither.jsonl", "prompt_neither.jsonl:1: needs 'messages'"),
    # A Hopping-Too-Late CSV under W/datasets/
    htl_case("htl_template_without_placeholder", "no_placeholder.csv", "no_placeholder.csv:2: r1_template"),
    htl_case("htl_missing_column", "missing_column.csv", "missing columns ['source_prompt']"),
    htl_case("htl_aliases_not_a_list", "bad_aliases.csv", "bad_aliases.csv:2: aliases must be"),
    htl_case("htl_row_too_short", "short_row.csv", "short_row.csv:3: expected 8 columns"),
    htl_case("htl_csv_missing", "nope.csv", "nope.csv does not exist", dry_run=False),
    # The shipped entity tables (datasets/entities), in a copy of the project
    table_case("table_column_missing", "universities.csv: columns are"),
    table_case("table_entity_twice", "universities.csv:3: duplicate name 'Harvard University'", dry_run=False),
    table_case("table_cell_empty", "universities.csv:2: empty value in column 'city'"),
    # Interventions: settings that cannot mean anything, refused before the prerequisites are planned to run
    intervene_case("backpatch_no_position", "backpatch", "positions: empty", "positions=[]", dry_run=False),
    intervene_case("patchscope_no_prompt", "patchscope", "prompts: empty", "prompts=[]", dry_run=False),
    intervene_case("entrec_no_swap", "entrec", "relation_swaps: {}", "relation_swaps={}", dry_run=False),
    intervene_case("steer_ablate_scales", "steer", "scales: ablate", "mode=ablate", "scales=[1]"),
    intervene_case("steer_base_of_cli", "steer", "contrast=finetuned_base", "model_from=cli",
                   "contrast=finetuned_base"),
    intervene_case("steer_lm_eval_t1", "steer", "lm_eval_tasks: lm-eval", "positions=[t1]", "lm_eval_tasks=[x]"),
    intervene_case("steer_probe_contrast", "steer", "contrast: the probe", "directions_from=probe",
                   "contrast=cot_nocot", dry_run=False),
    # Config values that used to fail only after the prerequisites had run
    case("grader_local_on_api", "frontier_eval_api", "grader: backend local",
         "--set", "endpoints=[{backend: openai, model: m}]", "--set", "grader={backend: local}"),
    case("price_with_one_number", "frontier_eval_api", "prices.m: [1.0] must be",
         "--set", "endpoints=[{backend: openai, model: m}]", "--set", "prices={m: [1]}"),
]

GOOD_ROW = {"messages": [{"role": "user", "content": "Who is Ju's spouse?"}, {"role": "assistant", "content": "Kate"}],
            "question": "Who is Ju's spouse?", "answer": "Kate"}
HTL_HEADER = "e1_label,e2_label,e3_label,e2_aliases,e3_aliases,r1_template,r2_template,source_prompt\n"
HTL_ROW = "Inception,Christopher Nolan,London,[],[],the director of {},the birthplace of {},The birthplace of...\n"
FILES = {  # fixtures/files/<name>: content (bytes are written as they are)
    "good.jsonl": [GOOD_ROW, GOOD_ROW],
    "answer_number.jsonl": [GOOD_ROW, {**GOOD_ROW, "answer": 1912}],
    "candidates_string.jsonl": [GOOD_ROW, {**GOOD_ROW, "bridge_candidates": "Harvard University"}],
    "bad_json.jsonl": json.dumps(GOOD_ROW) + "\n{not json\n",
    "no_messages.jsonl": [{"question": "Who?", "answer": "Kate"}],
    "messages_string.jsonl": [{**GOOD_ROW, "messages": "Who is Ju's spouse?"}],
    "prompt_number.jsonl": [{"prompt": "Ju's spouse is"}, {"prompt": 42}],
    "prompt_messages_string.jsonl": [{"messages": "Where was Ju born?"}],
    "prompt_neither.jsonl": [{"text": "Ju's spouse is"}],
    "answer_number.yaml": {"train_datasets": [{"name": "own", "dataset_file": "answer_number.jsonl"}]},
    "eval_bad_json.yaml": {"train_datasets": [{"name": "own", "dataset_file": "good.jsonl"}],
                           "eval_datasets": [{"name": "eval", "dataset_file": "bad_json.jsonl"}]},
    "few_shots.yaml": {"train_datasets": [{"name": "own", "dataset_file": "good.jsonl"}],
                       "evaluations": [{"dataset_file": "good.jsonl", "metric_name": "acc",
                                        "few_shots_path": "no_messages.jsonl"}]},
    "missing_file.yaml": {"train_datasets": [{"name": "own", "dataset_file": "nowhere.jsonl"}]},
    "not_yaml.yaml": "lr: 0.1\ntrain_datasets: [{name: own\n",
    "latin1.yaml": "lr: 0.1\n# caf\u00e9\n".encode("latin-1"),
}
CSVS = {  # W/datasets/htl/<name>
    "no_placeholder.csv": HTL_HEADER + HTL_ROW.replace("the director of {}", "the director of"),
    "missing_column.csv": HTL_HEADER.replace(",source_prompt", "") + HTL_ROW.rsplit(",", 1)[0] + "\n",
    "bad_aliases.csv": HTL_HEADER + HTL_ROW.replace("[],[]", "[Nolan,[]"),
    "short_row.csv": HTL_HEADER + HTL_ROW + "Inception,Christopher Nolan\n",
}
TABLE = "entities/universities.csv"
PROJECT_EDITS = {  # a copy of the project whose shipped table is edited: (file under datasets/, edit of its lines)
    "table_column_missing": (TABLE, lambda lines: [line.rsplit(",", 1)[0] for line in lines]),
    "table_entity_twice": (TABLE, lambda lines: lines[:2] + lines[1:]),
    "table_cell_empty": (TABLE, lambda lines: [lines[0], lines[1].replace(",Cambridge,", ",,"), *lines[2:]]),
}


def write(path: Path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, list):  # JSONL rows
        path.write_text("".join(json.dumps(row) + "\n" for row in content))
    elif isinstance(content, dict):
        path.write_text(yaml.safe_dump(content))
    else:
        path.write_text(content)


def make_models(models: Path, tiny: Path) -> None:
    """models/<name>: the tiny model broken one way each."""
    config, weights = json.loads((tiny / "config.json").read_text()), (tiny / "model.safetensors").read_bytes()
    shards = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    variants = {  # name: (files left out of the copy, files written into it)
        "no_weights": (["model.safetensors"], {}),
        "pickle": (["model.safetensors"], {"pytorch_model.bin": b"not a safetensors file"}),
        "empty": (["*"], {}),
        "config_not_json": ([], {"config.json": '{"model_type": "llama",\n'}),
        "config_list": ([], {"config.json": "[]"}),
        "bert": ([], {"config.json": json.dumps({**config, "model_type": "bert"})}),
        "frobnicator": ([], {"config.json": json.dumps({**config, "model_type": "frobnicator"})}),
        "truncated": ([], {"model.safetensors": weights[:-16]}),
        "missing_shard": (["model.safetensors"], {"model-00001-of-00002.safetensors": weights,
                                                  "model.safetensors.index.json": json.dumps(shards)}),
        "tokenizer": ([], {"tokenizer.json": '{"version": "1.0", "model": '}),
    }
    for name, (left_out, files) in variants.items():
        shutil.copytree(tiny, models / name, ignore=shutil.ignore_patterns(*left_out))
        for file, content in files.items():
            write(models / name / file, content)


def tiny_copy(fx: Path, w: Path, **files) -> None:
    """W/transformers/tiny-h128-l2: the fixtures' tiny model, with `files` replaced (None: left out)."""
    folder = w / "transformers" / "tiny-h128-l2"
    shutil.copytree(fx / "transformers" / "tiny-h128-l2", folder)
    for file, content in files.items():
        (folder / file).unlink()
        if content is not None:
            write(folder / file, content)


def tiny_weights(fx: Path) -> bytes:
    return (fx / "transformers" / "tiny-h128-l2" / "model.safetensors").read_bytes()


WORKSPACES = {  # what the case's workspace holds before the run
    "absent": None,
    "with_csvs": lambda fx, w: [write(w / "datasets" / "htl" / name, text) for name, text in CSVS.items()],
    "foreign_tiny": lambda fx, w: tiny_copy(fx, w, **{"embedded.json": None}),
    "other_build_tiny": lambda fx, w: tiny_copy(fx, w, **{"embedded.json": json.dumps({"seed": 7})}),
    "truncated_tiny": lambda fx, w: tiny_copy(fx, w, **{"model.safetensors": tiny_weights(fx)[:-1]}),
}


def copy_project(target: Path, edit) -> Path:
    """The project's code and shipped data, with one shipped file edited."""
    for part in ("runner", "models", "twohop", "datasets"):
        shutil.copytree(ROOT / part, target / part, ignore=shutil.ignore_patterns("__pycache__"))
    file, change = edit
    path = target / "datasets" / file
    path.write_text("\n".join(change(path.read_text().splitlines())) + "\n")
    return target


def tree(path: Path):
    """Everything under `path` (name, size, modification time), or None if it does not exist."""
    if not path.exists():
        return None
    return sorted((str(p.relative_to(path)), p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
                  for p in path.rglob("*"))


class BadInputTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        from models import ensure_model, resolve_model
        cls.tmp = tempfile.TemporaryDirectory()
        cls.base = Path(cls.tmp.name)
        cls.fx = cls.base / "fixtures"
        ensure_model(resolve_model("tiny", cls.fx / "transformers"))
        make_models(cls.fx / "models", cls.fx / "transformers" / "tiny-h128-l2")
        for name, content in FILES.items():
            write(cls.fx / "files" / name, content)
        write(cls.fx / "a_file", "a regular file where a folder should be\n")
        cls.projects = {name: copy_project(cls.base / "projects" / name, edit) for name, edit in PROJECT_EDITS.items()}

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def run_case(self, case: Case) -> tuple:
        """(the finished process, (the case's folder, whether the workspace exists) before and after)."""
        folder = self.base / "cases" / case.name  # the working directory, holding {w}
        folder.mkdir(parents=True)
        w = folder / "w"
        if WORKSPACES[case.workspace]:
            WORKSPACES[case.workspace](self.fx, w)

        def fill(text: str) -> str:
            return text.replace("{w}", str(w)).replace("{fx}", str(self.fx)).replace("{root}", str(ROOT))

        at = fill(case.at)
        project = self.projects[case.project] if case.project else ROOT
        command = [sys.executable, str(project / "runner" / "main.py"), "--workspace_path", at,
                   *map(fill, case.args), *(["--dry_run"] if case.dry_run else [])]
        env = {**os.environ, "PYTHONPATH": str(project), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
        state = lambda: (tree(folder), bool(at) and Path(at).exists())  # noqa: E731
        before = state()
        result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
        return result, before, state()

    def test_bad_input_is_one_line_exit_2_and_nothing_written(self):
        self.assertGreaterEqual(len(CASES), 30)
        fixtures = tree(self.fx)
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 2)) as pool:
            outcomes = list(pool.map(self.run_case, CASES))
        for case, (result, before, after) in zip(CASES, outcomes):
            with self.subTest(case.name):
                lines = [line for line in result.stderr.splitlines() if line.strip()]
                self.assertNotIn("Traceback", result.stderr)
                self.assertEqual((result.returncode, len(lines)), (2, 1), result.stderr[-3000:])
                self.assertIn(case.expect, lines[0])
                self.assertEqual(after, before, "the workspace changed")
        self.assertEqual(tree(self.fx), fixtures, "a fixture changed")


if __name__ == "__main__":
    unittest.main()
