"""One writer per run folder, across invocations, processes and hosts sharing a workspace.

The run folder's `lock.json` names its holder (host, pid, since) and carries a heartbeat that a
daemon thread refreshes while the run executes. It is created with O_CREAT | O_EXCL, which is
atomic on local disks and on NFS v3+, so two invocations never both hold it. A holder is gone when
its process is dead (checked only where its pid means something: the same host and pid namespace,
as containers may share a host name) or when its heartbeat is older than STALE_AFTER_S (anywhere);
its lock is then taken over. Breaking a lock is itself guarded by `lock.json.break`, so two
processes that find the same stale lock do not both take it.
"""
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import threading
import time
import uuid
from pathlib import Path

from runner.errors import UserError

LOCK_NAME = "lock.json"
HEARTBEAT_S = 10.0  # how often a holder refreshes its heartbeat
STALE_AFTER_S = 120.0  # a heartbeat older than this means the holder is gone (killed, or its host is)
POLL_S = 1.0  # how often a waiting invocation looks at the lock again

log = logging.getLogger("twohop")


class LockBusy(UserError):
    """The run folder is held by a live process and we were told not to wait."""


def read_holder(folder) -> dict:
    """The lock's record, {} if there is no lock; a lock still being written counts as fresh."""
    path = Path(folder) / LOCK_NAME
    try:
        text, modified = path.read_text(encoding="utf-8"), path.stat().st_mtime
    except FileNotFoundError:
        return {}
    try:
        return json.loads(text)
    except ValueError:  # created but not written yet, or mid-heartbeat
        return {"heartbeat": modified}


def why_gone(holder: dict):
    """Why the holder no longer holds its lock (a sentence), or None while it is alive."""
    silent_s = time.time() - holder["heartbeat"]
    if silent_s > STALE_AFTER_S:
        return f"no heartbeat for {silent_s:.0f} s"
    if holder.get("pid_space") == _pid_space() and not _process_alive(holder["pid"]):
        return "its process is gone"
    return None


def describe(holder: dict) -> str:
    if "pid" not in holder:
        return "a process still writing the lock"
    return f"host {holder['host']} pid {holder['pid']} since {holder['since']}"


def refuse_if_held(folder) -> None:
    """Raise LockBusy naming the live holder of `folder`, if there is one."""
    holder = read_holder(folder)
    if holder and why_gone(holder) is None:
        raise _busy(folder, holder)


def _busy(folder, holder: dict) -> LockBusy:
    return LockBusy(f"{folder} is being run by {describe(holder)}; drop --no_wait to wait for it")


class RunLock:
    """`with RunLock(run_dir).acquire(wait=True):` holds the run folder until the block ends."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.token, self.since = uuid.uuid4().hex, None
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat_until_stopped, daemon=True,
                                           name=f"heartbeat {self.folder}")

    def acquire(self, wait: bool = True) -> "RunLock":
        """Take the lock; wait for a live holder (or raise LockBusy), take over from a gone one."""
        announced = None
        while not self._create():
            holder = read_holder(self.folder)
            if not holder:  # released just now
                continue
            reason = why_gone(holder)
            if reason is None:
                if not wait:
                    raise _busy(self.folder, holder)
                if describe(holder) != announced:
                    announced = describe(holder)
                    log.info("waiting for %s: it is being run by %s", self.folder, announced)
            elif self._break(holder):
                log.warning("taking over the lock of %s from %s: %s", self.folder, describe(holder), reason)
                continue
            time.sleep(POLL_S)
        self._heartbeat.start()
        return self

    def release(self) -> None:
        self._stop.set()
        self._heartbeat.join()
        if read_holder(self.folder).get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def _record(self) -> dict:
        return {"host": platform.node(), "pid": os.getpid(), "since": self.since, "heartbeat": time.time(),
                "pid_space": _pid_space(), "token": self.token}

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        self.since = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self._record(), f)
        return True

    def _break(self, holder: dict) -> bool:
        """Remove the lock if it still holds `holder`'s record; only one process breaks it at a time."""
        breaker = self.path.with_name(LOCK_NAME + ".break")
        try:
            os.close(os.open(breaker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:  # another process is breaking it; one that died doing so is cleared
            with contextlib.suppress(FileNotFoundError):
                if time.time() - breaker.stat().st_mtime > STALE_AFTER_S:
                    breaker.unlink()
            return False
        try:
            if read_holder(self.folder) != holder:  # refreshed or replaced since we looked
                return False
            self.path.unlink(missing_ok=True)
            return True
        finally:
            breaker.unlink(missing_ok=True)

    def _beat_until_stopped(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if not self._beat():
                log.error("lost the lock of %s: it was removed or taken over (this process's heartbeat "
                          "stopped for over %.0f s?); its outputs may mix with another's", self.folder, STALE_AFTER_S)
                return

    def _beat(self) -> bool:
        """Refresh the heartbeat in place: a lock that was removed or replaced is never written."""
        try:
            with open(self.path, "r+", encoding="utf-8") as f:
                if json.loads(f.read()).get("token") != self.token:
                    return False
                f.seek(0)
                json.dump(self._record(), f)
                f.truncate()
            return True
        except (FileNotFoundError, ValueError):  # removed, or replaced by a lock still being written
            return False


def _pid_space() -> str:
    """Where a pid names one process: this host and, on Linux, this pid namespace."""
    try:
        return f"{platform.node()} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return platform.node()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return True
