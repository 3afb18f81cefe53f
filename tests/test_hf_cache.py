"""`--model org/name` from a Hugging Face cache the test lays out, offline: resolution, a real run through
the runner, a new revision rerunning what depends on it, and the one-line error when the model is absent.

The cache is laid out as huggingface_hub lays it out (models--org--name/blobs/<etag>,
snapshots/<commit>/<file> -> ../../blobs/<etag>, refs/main = the commit), and huggingface_hub's own
scan_cache_dir reads it back, so the layout is the library's and not the test's idea of it.
"""
import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import unittest
from pathlib import Path
from unittest import mock

import huggingface_hub
import torch
from huggingface_hub import constants, scan_cache_dir
from huggingface_hub.file_download import repo_folder_name
from safetensors.torch import load_file, save_file

from models import load_model, model_fingerprint, resolve_model, tiny
from runner.errors import UserError
from runner.main import main

REPO_ID = "test-org/tiny-chat"


def blob_id(file: Path) -> str:
    """The hub's etag, which names the blob: sha256 for LFS files (weights), the git blob sha1 otherwise."""
    data = file.read_bytes()
    if file.suffix == ".safetensors":
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def place_snapshot(cache: Path, repo_id: str, folder: Path, commit: str) -> Path:
    """Put `folder`'s files in the cache as snapshot `commit` of `repo_id`; blobs are shared between snapshots."""
    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in sorted(folder.iterdir()):
        blob = repo / "blobs" / blob_id(file)
        if not blob.exists():
            shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def point_ref(cache: Path, repo_id: str, commit: str, ref: str = "main") -> None:
    refs = cache / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / ref).write_text(commit)


def commit_hash(label: str) -> str:
    return hashlib.sha1(label.encode()).hexdigest()


def run_id(run_dir: Path) -> str:
    return json.loads((run_dir / "status.json").read_text())["run_id"]


def cli(*argv) -> tuple:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(argv))
    return code, err.getvalue()


class HuggingFaceCacheTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        root = Path(cls.tmp.name)
        cls.first = tiny.build_tiny_model("tiny", root / "first", seed=0)  # random init, tokenizer, chat template
        cls.second = root / "second"  # the same model with other weights: a new revision
        shutil.copytree(cls.first, cls.second)
        weights = load_file(cls.second / "model.safetensors")
        torch.manual_seed(1)
        save_file({k: v + 0.01 * torch.randn_like(v) for k, v in weights.items()}, cls.second / "model.safetensors",
                  metadata={"format": "pt"})

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def setUp(self):
        work = tempfile.TemporaryDirectory()
        self.addCleanup(work.cleanup)
        self.cache = Path(work.name) / "hub"
        self.w = Path(work.name) / "w"
        self.snapshot_a = place_snapshot(self.cache, REPO_ID, self.first, commit_hash("a"))
        point_ref(self.cache, REPO_ID, commit_hash("a"))
        offline = [mock.patch.dict(os.environ, {"HF_HUB_CACHE": str(self.cache), "HF_HUB_OFFLINE": "1"}),
                   mock.patch.object(constants, "HF_HUB_CACHE", str(self.cache)),  # read once, at import
                   mock.patch.object(constants, "HF_HUB_OFFLINE", True)]
        for patch in offline:
            patch.start()
            self.addCleanup(patch.stop)

    def test_a_hub_name_resolves_to_the_cached_snapshot_offline(self):
        [repo] = scan_cache_dir(self.cache).repos  # the library reads the layout back
        self.assertEqual((repo.repo_id, [r.commit_hash for r in repo.revisions]), (REPO_ID, [commit_hash("a")]))
        ref = resolve_model(REPO_ID, self.w / "transformers")
        self.assertEqual((ref.path, ref.tag, ref.source), (self.snapshot_a, "test-org--tiny-chat", "hf_cache"))
        load_model(ref.path)
        snapshot_b = place_snapshot(self.cache, REPO_ID, self.second, commit_hash("b"))
        pinned = resolve_model(f"{REPO_ID}@{commit_hash('b')}", self.w / "transformers")
        self.assertEqual((pinned.path, pinned.tag), (snapshot_b, f"test-org--tiny-chat@{commit_hash('b')}"))
        self.assertNotEqual(model_fingerprint(snapshot_b), model_fingerprint(self.snapshot_a))

    def test_a_folder_under_the_workspace_comes_before_the_cache(self):
        folder = self.w / "transformers" / "test-org" / "tiny-chat"
        shutil.copytree(self.first, folder)
        ref = resolve_model(REPO_ID, self.w / "transformers")
        self.assertEqual((ref.path, ref.tag, ref.source), (folder, "test-org--tiny-chat", "workspace"))

    def test_a_run_on_the_cached_model_is_skipped_until_main_points_to_a_new_revision(self):
        argv = ["--workspace_path", str(self.w), "--model", REPO_ID, "--jobs", "intervene_patch",
                "--set", "model_from=cli", "--set", "max_items=4", "--set", "bootstrap=10"]
        patch_run = self.w / "experiments" / "intervene" / "patch" / "test-org--tiny-chat" / "seed_1"
        data_run = self.w / "experiments" / "generate_data" / "spouses"

        code, err = cli(*argv)
        self.assertEqual(code, 0, err[-2000:])
        self.assertEqual(json.loads((patch_run / "results.json").read_text())["model"], str(self.snapshot_a))
        first = (run_id(patch_run), run_id(data_run))
        self.assertEqual(cli(*argv)[0], 0)
        self.assertEqual((run_id(patch_run), run_id(data_run)), first, "same snapshot: both runs skipped")

        snapshot_b = place_snapshot(self.cache, REPO_ID, self.second, commit_hash("b"))
        point_ref(self.cache, REPO_ID, commit_hash("b"))
        self.assertEqual(cli(*argv)[0], 0)
        self.assertNotEqual(run_id(patch_run), first[0], "a new revision reruns the run that used the model")
        self.assertEqual(run_id(data_run), first[1], "the data does not depend on the model")
        self.assertEqual(json.loads((patch_run / "results.json").read_text())["model"], str(snapshot_b))

    def test_an_absent_model_is_one_line_naming_every_place_looked(self):
        code, err = cli("--workspace_path", str(self.w), "--model", "test-org/absent", "--jobs", "intervene_patch",
                        "--set", "model_from=cli")
        self.assertEqual(code, 2)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        for place in (self.w / "transformers" / "test-org" / "absent", "a folder at test-org/absent",
                      f"{self.cache} (HF_HUB_CACHE)", "HF_HUB_OFFLINE is set"):
            self.assertIn(str(place), err)
        self.assertFalse((self.w / "experiments" / "intervene").exists())

    def test_without_offline_an_unreachable_hub_fails_at_once_without_downloading(self):
        unreachable = OSError("[Errno 101] Network is unreachable")
        with mock.patch.object(constants, "HF_HUB_OFFLINE", False), \
                mock.patch("socket.create_connection", side_effect=unreachable) as connect, \
                mock.patch.object(huggingface_hub, "snapshot_download", wraps=huggingface_hub.snapshot_download) \
                as snapshot_download:
            with self.assertRaisesRegex(UserError, r"no download \(cannot reach https://huggingface\.co: .*unreachable"):
                resolve_model("test-org/absent", self.w / "transformers")
            self.assertEqual(connect.call_count, 1)
            self.assertEqual(snapshot_download.call_count, 1)
            self.assertTrue(snapshot_download.call_args.kwargs["local_files_only"], "the cache only; no download")
            with self.assertRaisesRegex(UserError, r"no download \(--dry_run and --help_config only look\)"):
                resolve_model("test-org/absent", self.w / "transformers", download=False)
            self.assertEqual(connect.call_count, 1)


if __name__ == "__main__":
    unittest.main()
