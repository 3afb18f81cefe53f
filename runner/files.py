"""Atomic file writes, reading the user's text files, and content hashing.

Every file the project writes goes through here: data lands in a temporary sibling first and is
renamed into place, so a killed process never leaves a half-written file under the final name.
Temporaries are created with the modes `open` and `mkdir` use (0666 and 0777 less the umask), not
tempfile's private 0600 / 0700, so a workspace shared through a group umask stays readable.
"""
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import stat
from pathlib import Path

import yaml

from runner.errors import UserError


def _create_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _temp_sibling(path: Path, create=_create_file) -> Path:
    """A new `.<name>.<random>.tmp` beside `path`, made by `create` (which fails if it exists)."""
    while True:
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            create(candidate)
            return candidate
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", encoding: str = "utf-8"):
    """Stream into a temporary sibling; it becomes `path` only when the block finishes cleanly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def to_json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n"


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, to_json(obj))


def atomic_write_jsonl(path, rows) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_jsonl(path, rows) -> None:
    """Append rows to a JSONL log, flushed and synced: a killed run keeps every row written before it."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        f.flush()
        os.fsync(f.fileno())


def resume_jsonl(path) -> list:
    """The complete rows of a JSONL log written by `append_jsonl` ([] if none), rewritten without the
    line a kill may have cut short, so that appending continues it cleanly."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.endswith("\n"):  # cut short
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    atomic_write_jsonl(path, rows)
    return rows


def read_text(path, what: str = "file") -> str:
    """A UTF-8 text file's content. A missing, unreadable or non-UTF-8 file is one UserError naming it
    (`what` says what the file is), never a traceback: every input file the user gives is read here."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a folder; give a file") from None
    except UnicodeDecodeError as error:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {error.start} is 0x{error.object[error.start]:02x}); "
                        "save it as UTF-8") from None
    except OSError as error:
        raise UserError(f"{what} {path} cannot be read: {error.strerror}") from None


def read_yaml(path, what: str = "file"):
    """A YAML file's content; invalid YAML is one UserError naming the file, line and column."""
    try:
        return yaml.safe_load(read_text(path, what))
    except yaml.YAMLError as error:
        mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise UserError(f"{path}: not valid YAML ({where}{problem or type(error).__name__})") from None


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@contextlib.contextmanager
def atomic_directory(path):
    """Build a directory in a temporary sibling and move it into place only if the block succeeds.

    An existing directory at `path` is replaced. On any error the temporary directory is removed,
    so readers see either the old complete directory or the new complete one, never a mix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = _temp_sibling(path, create=os.mkdir)
    try:
        yield staging
        _honour_umask(staging)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(staging, path)
            shutil.rmtree(old)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _honour_umask(staging: Path) -> None:
    """Give the files under `staging` the mode `open` would have: safetensors writes its files 0600.

    `staging` was made by `os.mkdir(path, 0o777)`, so its mode is what the umask (or a default ACL)
    allows. Folders are left alone: they come from mkdir already, and chmod would drop a setgid bit.
    """
    file_mode = stat.S_IMODE(staging.stat().st_mode) & 0o666
    for path in staging.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(file_mode)


def clear_directory(directory, keep=()) -> None:
    """Delete everything in `directory` except the entries named in `keep`."""
    for entry in Path(directory).iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def remove_stale_temporaries(directory) -> None:
    """Delete leftovers of writes that a killed process never finished."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for leftover in directory.rglob(".*.tmp"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(obj) -> str:
    """A short stable hash of any JSON-serialisable object."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())[:16]
