"""Resolve `--model` to a local folder and load it with the ordinary Hugging Face Auto classes.

`--model` is, in this order: an embedded tiny preset (built on demand into
`W/transformers/<preset>/`), a folder name under `W/transformers/`, or a path. Only local files
are read, `trust_remote_code` is off unless asked for, and weights must be safetensors.
"""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from runner.errors import UserError
from runner.files import atomic_directory, atomic_write_json, read_json, sha256_file
from models import tiny

DEFAULT_MODEL = "tiny"
SMALL_FILE = 64 << 20  # weights up to this size are hashed; larger ones are identified by size+mtime


@dataclass(frozen=True)
class ModelRef:
    name: str  # as the user wrote it
    tag: str  # folder-safe identity used in run folder paths
    path: Path
    embedded_preset: str = None  # set for the project's own tiny models
    seed: int = 0


def resolve_model(name: str, transformers_dir, seed: int = 0) -> ModelRef:
    transformers_dir = Path(transformers_dir)
    preset = tiny.ALIASES.get(name, name)
    if preset in tiny.PRESETS:
        tag = preset if seed == 0 else f"{preset}-seed{seed}"
        return ModelRef(name, tag, transformers_dir / tag, embedded_preset=preset, seed=seed)
    candidates = [transformers_dir / name, Path(name).expanduser()]
    for path in candidates:
        if path.is_dir():
            path = path.resolve()
            if path.parent == transformers_dir.resolve():
                tag = path.name
            else:
                tag = f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
            return ModelRef(name, tag, path)
    looked = ", ".join(str(p) for p in candidates)
    raise UserError(
        f"model {name!r} not found: looked for an embedded preset ({', '.join([*tiny.ALIASES, *tiny.PRESETS])}) "
        f"and for a folder at {looked}. Put a Hugging Face model folder there or pass --model tiny."
    )


def ensure_model(ref: ModelRef) -> Path:
    """Build an embedded model if it is missing; check that the folder is a loadable model."""
    if ref.embedded_preset:
        record = tiny.build_record(ref.embedded_preset, ref.seed)
        marker = ref.path / "embedded.json"
        if marker.exists() and read_json(marker) != record:
            raise UserError(f"{ref.path} holds a different build ({marker}); delete the folder to rebuild it")
        if not ref.path.exists():
            with atomic_directory(ref.path) as staging:
                tiny.build_tiny_model(ref.embedded_preset, staging, seed=ref.seed)
                atomic_write_json(staging / "embedded.json", record)
        elif not marker.exists():
            raise UserError(f"{ref.path} exists but was not built by this project (no embedded.json); "
                            "rename it or choose another --model")
    check_model_folder(ref.path)
    return ref.path


def check_model_folder(path: Path) -> None:
    problems = []
    if not (path / "config.json").is_file():
        problems.append("no config.json")
    if not list(path.glob("*.safetensors")):
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        problems.append("no *.safetensors weights" + (f" (pickled weights {pickles} are not loaded)" if pickles else ""))
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        problems.append("no tokenizer.json or tokenizer.model")
    if problems:
        raise UserError(f"model folder {path} is not usable: {'; '.join(problems)}. "
                        "Save a model there with save_pretrained(..., safe_serialization=True).")


def load_model(path, device="cpu", dtype=None, trust_remote_code=False):
    """Load (model, tokenizer) from a local folder; the model is in eval mode on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from models.families import family_of, preferred_dtype

    path = Path(path)
    check_model_folder(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
        family_of(config)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or preferred_dtype(config, device), use_safetensors=True,
            trust_remote_code=trust_remote_code, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError, json.JSONDecodeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot load the model in {path}: {first_line}") from error
    if tokenizer.pad_token is None:  # Llama-3 ships none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def model_fingerprint(path) -> str:
    """Identity of a model folder's contents, cheap even for multi-GB weights."""
    path = Path(path)
    parts = []
    for file in sorted(path.iterdir()):
        if not file.is_file() or file.name == "embedded.json":
            continue
        stat = file.stat()
        if stat.st_size <= SMALL_FILE:
            parts.append(f"{file.name}:{sha256_file(file)}")
        else:
            parts.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
