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
from runner.files import atomic_directory, atomic_write_json, read_json, read_text, sha256_file
from models import tiny
from models.families import family_named

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
    if not name.strip():
        raise UserError("--model is empty; give an embedded preset (tiny), a folder name under W/transformers/ "
                        "or a path")
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
    if ref.embedded_preset and not ref.path.exists():
        with atomic_directory(ref.path) as staging:
            tiny.build_tiny_model(ref.embedded_preset, staging, seed=ref.seed)
            atomic_write_json(staging / "embedded.json", tiny.build_record(ref.embedded_preset, ref.seed))
    elif ref.embedded_preset:
        check_embedded_build(ref)
    check_model_folder(ref.path)
    return ref.path


def check_model(ref: ModelRef) -> None:
    """Before anything runs: the folder `--model` names loads with `load_model`, tokenizer included. An
    embedded model that is not built yet is left to `ensure_model`, which builds it when a run needs it."""
    if ref.embedded_preset:
        if not ref.path.exists():
            return
        check_embedded_build(ref)
    check_model_folder(ref.path)
    check_tokenizer(ref.path)


def check_embedded_build(ref: ModelRef) -> None:
    """A folder at an embedded preset's path must be this project's build of that preset."""
    marker = ref.path / "embedded.json"
    if not marker.is_file():
        raise UserError(f"{ref.path} exists but was not built by this project (no embedded.json); "
                        "rename it or choose another --model")
    try:
        same = read_json(marker) == tiny.build_record(ref.embedded_preset, ref.seed)
    except ValueError:
        same = False
    if not same:
        raise UserError(f"{ref.path} holds a different build ({marker}); delete the folder to rebuild it")


def check_model_folder(path: Path) -> None:
    """What `load_model` reads, checked cheaply: config.json names a supported architecture, the weights
    are safetensors (every shard present), and a tokenizer file is there; each weights file's header
    reads and its size matches what the header declares (a truncated or corrupted file fails here)."""
    if not path.is_dir():
        raise UserError(f"model folder {path} is a file; give a folder saved with save_pretrained")
    problems = []
    if not (path / "config.json").is_file():
        problems.append("no config.json")
    if not list(path.glob("*.safetensors")):
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        problems.append("no *.safetensors weights" + (f" (pickled weights {pickles} are not loaded)" if pickles else ""))
    problems += [f"shard {name} (in {index.name}) is missing" for index in path.glob("*.safetensors.index.json")
                 for name in sorted(set(_read_model_json(index).get("weight_map", {}).values()))
                 if not (path / name).is_file()]
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        problems.append("no tokenizer.json or tokenizer.model")
    if problems:
        raise UserError(f"model folder {path} is not usable: {'; '.join(problems)}. "
                        "Save a model there with save_pretrained(..., safe_serialization=True).")
    config = _read_model_json(path / "config.json")
    family_named(config.get("model_type"), f"{path / 'config.json'}: model_type")
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors(weights)


def _read_model_json(file: Path) -> dict:
    try:
        content = json.loads(read_text(file, "model file"))
    except json.JSONDecodeError as error:
        raise UserError(f"{file}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
                        "save the model again with save_pretrained") from None
    if not isinstance(content, dict):
        raise UserError(f"{file}: expected a JSON object; save the model again with save_pretrained")
    return content


def check_safetensors(file: Path) -> None:
    """The header reads; safe_open also checks that the file is exactly as long as the header's offsets say."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(file, framework="pt") as weights:
            weights.keys()
    except (SafetensorError, OSError) as error:
        raise UserError(f"weights file {file} does not read ({_first_line(error)}): truncated or corrupted? "
                        "Copy or save it again") from None


def load_tokenizer(path):
    """A local model folder's tokenizer alone (data made for one model's tokenizer needs no weights)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def check_tokenizer(path: Path) -> None:
    try:
        load_tokenizer(path)
    except Exception as error:  # whatever stops it from loading is what this check is for
        raise UserError(f"the tokenizer in {path} does not load ({type(error).__name__}: {_first_line(error)}); "
                        "save it again with tokenizer.save_pretrained") from None


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def load_model(path, device="cpu", dtype=None, trust_remote_code=False, attn_implementation=None):
    """Load (model, tokenizer) from a local folder; the model is in eval mode on `device`.
    `attn_implementation="eager"` gives every layer the 4D attention mask (attention knockout needs it)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from models.families import family_of, preferred_dtype

    path = Path(path)
    check_model_folder(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
        family_of(config)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or preferred_dtype(config, device), use_safetensors=True,
            trust_remote_code=trust_remote_code, local_files_only=True, attn_implementation=attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError, json.JSONDecodeError) as error:
        raise UserError(f"cannot load the model in {path}: {_first_line(error)}") from error
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
