"""Two invocations never fight: one writer per run folder (wait, --no_wait, take-over) and the umask."""
import contextlib
import io
import json
import os
import platform
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from pathlib import Path
from unittest import mock

import models  # noqa: F401  (imported here, the in-process invocations below reach their lock at once)
from runner import locks
from runner.files import atomic_directory, atomic_write_text
from runner.main import main
from runner.registry import Job, Registry, SubJob
from tests.test_runner import run_cli, status

ROOT = Path(__file__).resolve().parents[1]
HOLDER = f"host {platform.node()} pid {os.getpid()}"


def killed_holder(run_dir: Path) -> int:
    """Take the lock of `run_dir` in a real process, SIGKILL it, and return its pid."""
    hold = ("import sys, time; from runner.locks import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print(1, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", hold, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"1\n"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    return proc.pid


def modes(root: Path) -> set:
    """{("d" or "f", mode)} of everything under `root`."""
    return {("d" if p.is_dir() else "f", stat.S_IMODE(p.stat().st_mode)) for p in root.rglob("*")}


class ConcurrentInvocationsTest(unittest.TestCase):
    """Two real invocations on one workspace, both held back by a lock this test holds, then let go
    together; a third alone on another workspace is the reference. No training: generating data."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.addClassCleanup(cls.tmp.cleanup)
        cls.shared, cls.alone = Path(cls.tmp.name) / "shared", Path(cls.tmp.name) / "alone"
        cls.run_dir = cls.shared / "experiments" / "generate_data" / "spouses"
        cls.run_dir.mkdir(parents=True)
        holder = locks.RunLock(cls.run_dir).acquire()
        cls.stderr = [Path(cls.tmp.name) / f"stderr{i}.txt" for i in range(3)]
        procs = [cls.start(w, umask, err) for w, umask, err in
                 zip((cls.shared, cls.shared, cls.alone), (0o002, 0o002, 0o022), cls.stderr)]
        deadline = time.time() + 120
        while sum("waiting for" in err.read_text() for err in cls.stderr[:2]) < 2:
            if time.time() > deadline or any(p.poll() is not None for p in procs[:2]):
                holder.release()
                raise AssertionError("both invocations should wait for the lock: "
                                     + " | ".join(err.read_text()[-1000:] for err in cls.stderr[:2]))
            time.sleep(0.1)
        holder.release()
        cls.codes = [p.wait(timeout=120) for p in procs]
        cls.errs = [err.read_text() for err in cls.stderr]

    @classmethod
    def start(cls, workspace, umask, stderr_path):
        argv = [sys.executable, "runner/main.py", "--workspace_path", str(workspace), "--jobs", "generate_data_spouses"]
        with open(stderr_path, "w") as stderr:
            return subprocess.Popen(argv, cwd=ROOT, umask=umask, stdout=subprocess.DEVNULL, stderr=stderr)

    def test_both_exit_zero_and_the_run_is_done_once(self):
        self.assertEqual(self.codes, [0, 0, 0], self.errs)
        for err in self.errs[:2]:  # the one let go second may then wait for the first: a new holder
            self.assertEqual(err.count(f"waiting for {self.run_dir}: it is being run by {HOLDER} since"), 1, err)
        skipped = ["skip generate_data_spouses: done with the same inputs" in err for err in self.errs[:2]]
        self.assertEqual(sorted(skipped), [False, True], "one runs it, the other finds it done")
        self.assertEqual((self.run_dir / "log.txt").read_text().count("run generate_data_spouses ->"), 1)
        self.assertEqual(status(self.run_dir)["state"], "done")
        self.assertFalse((self.run_dir / locks.LOCK_NAME).exists(), "released")

    def test_outputs_are_those_of_a_single_run(self):
        alone = self.alone / "experiments" / "generate_data" / "spouses"
        per_run = {"config.json", "status.json", "log.txt"}  # times, paths and the command

        def outputs(run_dir):
            return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
                    if p.is_file() and p.name not in per_run}
        mine = outputs(self.run_dir)
        self.assertIn("data/world.json", mine)
        self.assertEqual(mine, outputs(alone))

    def test_files_and_folders_honour_the_umask(self):
        self.assertEqual(modes(self.alone), {("d", 0o755), ("f", 0o644)})
        self.assertEqual(modes(self.run_dir), {("d", 0o775), ("f", 0o664)})


def interrupt(ctx):
    (ctx.run_dir / "started.txt").write_text("")
    raise KeyboardInterrupt


INTERRUPTING = Registry([Job("delta", "a run stopped by Ctrl-C", (SubJob("delta", "stop", "raises KeyboardInterrupt",
                                                                         interrupt),))])


@mock.patch.multiple(locks, POLL_S=0.02, HEARTBEAT_S=0.05)
class RunLockTest(unittest.TestCase):
    """The toy registry in-process: holders that are alive, killed, silent or interrupted."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.w = Path(self.tmp.name) / "w"
        self.run_dir = self.w / "experiments" / "alpha" / "make"
        self.run_dir.mkdir(parents=True)

    def tearDown(self):
        self.tmp.cleanup()

    def cli(self, *argv):
        return run_cli("--workspace_path", str(self.w), "--jobs", "alpha_make", *argv)

    def test_no_wait_refuses_a_live_holder_in_one_line_and_touches_nothing(self):
        with locks.RunLock(self.run_dir).acquire() as holder:
            in_progress = self.run_dir / ".data.txt.0123abcd.tmp"  # the holder's write under way
            in_progress.write_text("half")
            code, _, err = self.cli("--no_wait")
            self.assertEqual(code, 2)
            self.assertEqual(len(err.strip().splitlines()), 1, err)
            self.assertIn(f"{self.run_dir} is being run by {HOLDER} since {holder.since}", err)
            self.assertTrue(in_progress.exists())
            self.assertFalse((self.run_dir / "status.json").exists())
            with self.assertRaises(locks.LockBusy):  # met at run time, after the up-front check
                locks.RunLock(self.run_dir).acquire(wait=False)

    def test_a_killed_holder_is_taken_over(self):
        pid = killed_holder(self.run_dir)
        self.assertEqual(locks.read_holder(self.run_dir)["pid"], pid)
        code, _, err = self.cli()
        self.assertEqual(code, 0, err)
        self.assertIn(f"taking over the lock of {self.run_dir} from host {platform.node()} pid {pid}", err)
        self.assertIn("its process is gone", err)
        self.assertEqual(status(self.run_dir)["state"], "done")
        self.assertFalse((self.run_dir / locks.LOCK_NAME).exists())

    def test_a_holder_elsewhere_is_judged_by_its_heartbeat_not_its_pid(self):
        pid = killed_holder(self.run_dir)  # a pid no process here has: it means nothing on another host
        since = "2026-01-01T00:00:00+00:00"
        (self.run_dir / locks.LOCK_NAME).write_text(json.dumps({
            "host": "elsewhere", "pid": pid, "since": since, "heartbeat": time.time(),
            "pid_space": "elsewhere pid:[4026531836]", "token": "theirs"}))
        with mock.patch.object(locks, "STALE_AFTER_S", 1.0):
            code, _, err = self.cli()
        self.assertEqual(code, 0, err)
        self.assertIn(f"waiting for {self.run_dir}: it is being run by host elsewhere pid {pid} since {since}", err)
        self.assertRegex(err, r"taking over the lock of .* from host elsewhere .*: no heartbeat for \d+ s")
        self.assertEqual(status(self.run_dir)["state"], "done")

    def test_the_heartbeat_advances_and_never_writes_a_lock_it_lost(self):
        lock = locks.RunLock(self.run_dir).acquire()
        first = locks.read_holder(self.run_dir)["heartbeat"]
        time.sleep(0.3)
        self.assertGreater(locks.read_holder(self.run_dir)["heartbeat"], first)
        theirs = json.dumps({"host": "elsewhere", "pid": 1, "since": "x", "heartbeat": 0.0, "token": "theirs"})
        with self.assertLogs("twohop", "ERROR") as logs:
            (self.run_dir / locks.LOCK_NAME).write_text(theirs)  # taken over while we were silent
            time.sleep(0.3)
        self.assertIn(f"lost the lock of {self.run_dir}", logs.output[0])
        self.assertEqual((self.run_dir / locks.LOCK_NAME).read_text(), theirs)
        lock.release()
        self.assertEqual((self.run_dir / locks.LOCK_NAME).read_text(), theirs, "release leaves another's lock")

    def test_an_interrupted_run_releases_its_lock(self):
        with self.assertRaises(KeyboardInterrupt), contextlib.redirect_stderr(io.StringIO()):
            main(["--workspace_path", str(self.w), "--jobs", "delta_stop"], registry=INTERRUPTING)
        run_dir = self.w / "experiments" / "delta" / "stop"
        self.assertTrue((run_dir / "started.txt").exists())
        self.assertEqual(status(run_dir)["error"], "interrupted")
        self.assertFalse((run_dir / locks.LOCK_NAME).exists())

    def test_sigterm_marks_a_real_run_interrupted_and_releases_its_lock(self):
        """What SLURM's scancel does to a fine-tune: the run is left resumable and unlocked."""
        proc = subprocess.Popen([sys.executable, "runner/main.py", "--workspace_path", str(self.w), "--jobs",
                                 "finetune_base"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run_dir = self.w / "experiments" / "finetune" / "base" / "tiny-h128-l2"
        deadline = time.time() + 120
        while not ((run_dir / "log.txt").is_file() and "training" in (run_dir / "log.txt").read_text()):
            self.assertLess(time.time(), deadline, "finetune_base never started training")
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        self.assertEqual((status(run_dir)["state"], status(run_dir)["error"]), ("failed", "interrupted"))
        self.assertFalse((run_dir / locks.LOCK_NAME).exists())

    def test_an_embedded_model_is_built_once_by_concurrent_invocations(self):
        from models import resolve_model, tiny
        from runner.execute import Executor, Workspace
        model, builds, real_build = resolve_model("tiny", self.w / "transformers"), [], tiny.build_tiny_model

        def slow_build(*args, **kwargs):
            builds.append(1)
            time.sleep(0.5)  # long enough for the other thread to find the build in progress
            return real_build(*args, **kwargs)
        with mock.patch.object(tiny, "build_tiny_model", slow_build):
            threads = [threading.Thread(target=Executor(Workspace(self.w)).ensure_model, args=(model,))
                       for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        self.assertEqual(len(builds), 1)
        self.assertTrue((model.path / "model.safetensors").is_file())

    def test_contenders_hold_the_lock_one_at_a_time_after_taking_over_a_dead_one(self):
        killed_holder(self.run_dir)
        holding, most, turns = [0], [0], []
        together = threading.Barrier(6)

        def contend():
            together.wait()
            for _ in range(3):
                with locks.RunLock(self.run_dir).acquire():
                    holding[0] += 1
                    most[0] = max(most[0], holding[0])
                    time.sleep(0.005)
                    holding[0] -= 1
                    turns.append(1)
        threads = [threading.Thread(target=contend) for _ in range(6)]
        with self.assertLogs("twohop", "INFO") as logs:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=30)
        self.assertEqual((len(turns), most[0]), (18, 1))
        self.assertEqual(sum("taking over" in line for line in logs.output), 1, "one breaks the dead lock")


class UmaskTest(unittest.TestCase):
    def test_atomic_writes_and_staged_folders_honour_the_umask(self):
        previous = os.umask(0o027)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                atomic_write_text(Path(tmp) / "out" / "a.txt", "a")
                with atomic_directory(Path(tmp) / "out" / "model") as staging:
                    (staging / "sub").mkdir()
                    os.close(os.open(staging / "sub" / "weights", os.O_WRONLY | os.O_CREAT, 0o600))  # as safetensors
                self.assertEqual(modes(Path(tmp) / "out"), {("d", 0o750), ("f", 0o640)})
        finally:
            os.umask(previous)


if __name__ == "__main__":
    unittest.main()
