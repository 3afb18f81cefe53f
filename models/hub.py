"""Models named as on the Hugging Face hub (`org/name`, `org/name@revision`): the local cache, then a download.

The cache is huggingface_hub's own (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub), laid
out as `models--org--name/refs/<revision>` (a commit hash) and `snapshots/<commit>/` (symlinks into
`blobs/`). Only huggingface_hub reads and writes it: `snapshot_download(local_files_only=True)` finds a
cached snapshot without any network, and `snapshot_download` downloads one when HF_HUB_OFFLINE is not set
and the hub answers a plain connection within CONNECT_TIMEOUT_S (no retries). A snapshot's identity is its
commit hash: a new revision of a model is a new model to the run fingerprints.
"""
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from runner.errors import first_line

log = logging.getLogger("twohop")
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]  # what load_model reads; not original/*.pth
CONNECT_TIMEOUT_S = 3
CACHE_VARIABLES = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME")  # huggingface_hub's precedence


class NotOnHub(Exception):
    """Where the cache and the download step looked, in one line, for the caller's 'not found' message."""


@dataclass(frozen=True)
class HubName:
    repo_id: str
    revision: str = None  # None: the default branch (main)

    @property
    def tag(self) -> str:
        """Folder-safe and readable: meta-llama--Llama-3.1-8B-Instruct, with @revision when one is asked for."""
        tag = self.repo_id.replace("/", "--")
        return f"{tag}@{self.revision.replace('/', '-')}" if self.revision else tag


def parse_hub_name(name: str):
    """`org/name` or `org/name@revision` as a HubName; None for anything that is not a hub repo id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    repo_id, at, revision = name.partition("@")
    if at and not revision.strip():
        return None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return HubName(repo_id, revision or None)


def cache_location() -> str:
    """The cache folder and what set it, e.g. '/data/hf/hub (HF_HUB_CACHE)'."""
    from huggingface_hub import constants
    setter = next((variable for variable in CACHE_VARIABLES if os.environ.get(variable)), None)
    return f"{constants.HF_HUB_CACHE} ({setter or 'the default; HF_HUB_CACHE or HF_HOME moves it'})"


def locate(hub_name: HubName, download: bool = True) -> Path:
    """The snapshot folder of `hub_name`: from the cache, else downloaded into it. NotOnHub says why not."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return Path(snapshot_download(hub_name.repo_id, revision=hub_name.revision, allow_patterns=MODEL_FILES,
                                      cache_dir=constants.HF_HUB_CACHE, local_files_only=True))
    except LocalEntryNotFoundError as error:
        cached = f"the Hugging Face cache {cache_location()}: {_cache_miss(error)}"
    if not download:
        raise NotOnHub(f"{cached}; no download (--dry_run and --help_config only look)")
    if constants.HF_HUB_OFFLINE:
        raise NotOnHub(f"{cached}; no download (HF_HUB_OFFLINE is set)")
    unreachable = _hub_unreachable(constants.ENDPOINT)
    if unreachable:
        raise NotOnHub(f"{cached}; no download ({unreachable})")
    return _download(hub_name, cached)


def _cache_miss(error: Exception) -> str:
    from huggingface_hub.errors import IncompleteSnapshotError
    if isinstance(error, IncompleteSnapshotError):
        return first_line(error)
    return "no snapshot of this revision"


def _hub_unreachable(endpoint: str):
    """None if a TCP connection to the hub opens within CONNECT_TIMEOUT_S, else why not."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        return f"cannot reach {endpoint}: {first_line(error)}"
    return None


def _download(hub_name: HubName, cached: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    log.info("downloading %s%s into %s", hub_name.repo_id, f"@{hub_name.revision}" if hub_name.revision else "",
             cache_location())
    try:
        return Path(snapshot_download(hub_name.repo_id, revision=hub_name.revision, allow_patterns=MODEL_FILES,
                                      cache_dir=constants.HF_HUB_CACHE, etag_timeout=CONNECT_TIMEOUT_S))
    except Exception as error:  # whatever stops the download is reported the same way, in one line
        raise NotOnHub(f"{cached}; the download failed ({type(error).__name__}: {first_line(error)}; a gated or "
                       "private model needs a token: `hf auth login` or HF_TOKEN)") from None


def snapshot_commit(path) -> str:
    """The commit hash of a folder that is a cache snapshot (models--org--name/snapshots/<commit>), else None."""
    from huggingface_hub.file_download import REGEX_COMMIT_HASH
    path = Path(path)
    if (REGEX_COMMIT_HASH.fullmatch(path.name) and path.parent.name == "snapshots"
            and path.parent.parent.name.startswith("models--")):
        return path.name
    return None
