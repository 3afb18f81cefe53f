"""Resolve `--model` to a local folder and load it with the ordinary Hugging Face Auto classes.

`--model` is, in this order: an embedded tiny preset (built on demand into
`W/transformers/<preset>/`), a folder under `W/transformers/` (`org/name` is the same relative path), a
path, or a Hugging Face hub name found in the local cache or downloaded into it (models.hub). Only local
files are loaded, `trust_remote_code` is off unless asked for, and weights must be safetensors. A folder
can also hold a LoRA adapter (`models.adapters`): it loads as its base with the adapter merged in.
"""
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from runner.errors import UserError, first_line
from runner.files import atomic_directory, atomic_write_json, read_json, read_text, sha256_file
from models import hub, tiny
from models.adapters import ADAPTER_WEIGHTS, base_candidates, is_adapter, merge_adapter
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
    source: str = "path"  # embedded | workspace | path | hf_cache: which step of resolve_model found it


def resolve_model(name: str, transformers_dir, seed: int = 0, download: bool = True) -> ModelRef:
    """`--model` in this order: an embedded preset, `W/transformers/<name>`, an existing path, the Hugging Face
    cache (offline), a download into that cache (models.hub; only with `download` and a reachable hub)."""
    if not name.strip():
        raise UserError("--model is empty; give an embedded preset (tiny), a folder name under W/transformers/, "
                        "a path or a Hugging Face name (org/name)")
    transformers_dir = Path(transformers_dir)
    preset = tiny.ALIASES.get(name, name)
    if preset in tiny.PRESETS:
        tag = preset if seed == 0 else f"{preset}-seed{seed}"
        return ModelRef(name, tag, transformers_dir / tag, embedded_preset=preset, seed=seed, source="embedded")
    folders = {"workspace": transformers_dir / name, "path": Path(name).expanduser()}
    for source, path in folders.items():
        if path.is_dir():
            return ModelRef(name, _folder_tag(path.resolve(), transformers_dir.resolve()), path.resolve(),
                            source=source)
    looked = [f"an embedded preset ({', '.join([*tiny.ALIASES, *tiny.PRESETS])})",
              *(f"a folder at {path}" for path in dict.fromkeys(folders.values()))]
    hub_name = hub.parse_hub_name(name)
    if hub_name is None:
        looked.append("the Hugging Face cache: skipped, not a hub name (org/name[@revision])")
    else:
        try:
            return ModelRef(name, hub_name.tag, hub.locate(hub_name, download), source="hf_cache")
        except hub.NotOnHub as where:
            looked.append(str(where))
    download_hint = f"download it (`hf download {hub_name.repo_id}`), " if hub_name else ""
    raise UserError(f"model {name!r} not found; looked for: {'; '.join(looked)}. Put a Hugging Face model folder "
                    f"there, {download_hint}or pass --model tiny.")


def _folder_tag(path: Path, transformers_dir: Path) -> str:
    """W/transformers/org/name -> org--name (as its hub name would be); any other folder -> name-<hash of path>."""
    if path.is_relative_to(transformers_dir) and path != transformers_dir:
        return "--".join(path.relative_to(transformers_dir).parts)
    return f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


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
    if is_adapter(path):
        return check_adapter_folder(path)
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


def check_adapter_folder(path: Path) -> None:
    """An adapter folder: its weights read, its tokenizer is there, and its base is the model it was trained on."""
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"adapter folder {path} has no {ADAPTER_WEIGHTS} (pickled adapters are not loaded); "
                        "save it with save_pretrained(..., safe_serialization=True)")
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        raise UserError(f"adapter folder {path} is not usable: no tokenizer.json or tokenizer.model")
    check_safetensors(path / ADAPTER_WEIGHTS)
    check_model_folder(adapter_base(path))


def adapter_base(path: Path) -> Path:
    """The base model folder of the adapter in `path`, refused unless it is the one the adapter was trained on."""
    candidates, trained_on = base_candidates(path)
    base = next((folder.resolve() for folder in candidates if folder.is_dir()), None)
    if base is None:
        raise UserError(f"the base model of adapter {path} is missing (looked for {', '.join(map(str, candidates))}); "
                        "put it back or rerun the fine-tune")
    if model_fingerprint(base) != trained_on:
        raise UserError(f"the base model {base} of adapter {path} changed since the adapter was trained on it; "
                        "rerun the fine-tune")
    return base


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
        raise UserError(f"weights file {file} does not read ({first_line(error)}): truncated or corrupted? "
                        "Copy or save it again") from None


def check_tokenizer(path: Path) -> None:
    try:
        _from_pretrained_tokenizer(path)
    except Exception as error:  # whatever stops it from loading is what this check is for
        raise UserError(f"the tokenizer in {path} does not load ({type(error).__name__}: {first_line(error)}); "
                        "save it again with tokenizer.save_pretrained") from None


def load_model(path, device="cpu", dtype=None, trust_remote_code=False, attn_implementation=None,
               quantize_4bit=False):
    """Load (model, tokenizer) from a local folder; the model is in eval mode on `device`.
    `attn_implementation="eager"` gives every layer the 4D attention mask (attention knockout needs it).
    An adapter folder loads as its base (loaded with these arguments) with the adapter merged in.
    `quantize_4bit` stores the weights in 4 bits with bitsandbytes (QLoRA's frozen base; a CUDA `device`)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from models.families import family_of, preferred_dtype

    path = Path(path)
    check_model_folder(path)
    if is_adapter(path):
        model, _ = load_model(adapter_base(path), device, dtype, trust_remote_code, attn_implementation, quantize_4bit)
        return merge_adapter(model, path).eval(), load_tokenizer(path, trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
        family_of(config)
        placement = _four_bit(config, device) if quantize_4bit else {}
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or preferred_dtype(config, device), use_safetensors=True,
            trust_remote_code=trust_remote_code, local_files_only=True, attn_implementation=attn_implementation,
            **placement)
    except (OSError, ValueError, json.JSONDecodeError) as error:
        raise UserError(f"cannot load the model in {path}: {first_line(error)}") from error
    return (model if quantize_4bit else model.to(device)).eval(), load_tokenizer(path, trust_remote_code)


def _four_bit(config, device) -> dict:
    """from_pretrained's arguments for NF4 weights (double quantisation) placed on `device` as they load."""
    import torch
    from transformers import BitsAndBytesConfig
    from models.families import family_of
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=family_of(config).accelerator_dtype)
    return {"quantization_config": quantization, "device_map": {"": torch.device(device)}}


def _from_pretrained_tokenizer(path: Path, trust_remote_code: bool = False):
    """The tokenizer as it was saved. A folder whose tokenizer_config.json names the generic TokenizersBackend
    (what transformers 5 saves for a tokenizer built with `tokenizers`) loads as that class: AutoTokenizer would
    swap in the model type's own class for some types (qwen2, phi3), which rebuilds the pre-tokenizer and so
    encodes text differently from the tokenizer the model was trained with."""
    from transformers import AutoTokenizer, TokenizersBackend
    config = Path(path) / "tokenizer_config.json"
    generic = config.is_file() and read_json(config).get("tokenizer_class") == "TokenizersBackend"
    loader = TokenizersBackend if generic else AutoTokenizer
    return loader.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """A local model folder's tokenizer, with a pad token (data made for one model's tokenizer needs no weights)."""
    try:
        tokenizer = _from_pretrained_tokenizer(path, trust_remote_code)
    except (OSError, ValueError, json.JSONDecodeError) as error:
        raise UserError(f"cannot load the tokenizer in {path}: {first_line(error)}") from error
    if tokenizer.pad_token is None:  # Llama-3 ships none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_fingerprint(path) -> str:
    """Identity of a model folder's contents, cheap even for multi-GB weights; an adapter's covers its base's. A
    Hugging Face cache snapshot is its commit hash (immutable on the hub: a new revision is a new snapshot folder)."""
    path = Path(path)
    commit = hub.snapshot_commit(path)
    if commit:
        return hashlib.sha256(f"hf-snapshot:{commit}".encode()).hexdigest()[:16]
    parts = []
    for file in sorted(path.iterdir()):
        if not file.is_file() or file.name == "embedded.json":
            continue
        stat = file.stat()
        if stat.st_size <= SMALL_FILE:
            parts.append(f"{file.name}:{sha256_file(file)}")
        else:
            parts.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    if is_adapter(path):
        parts.append(f"base:{model_fingerprint(adapter_base(path))}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
