"""A fine-tune saved as a LoRA adapter: the folder format every job reads like a full model folder.

The folder holds what `peft` saves (`adapter_config.json`, `adapter_model.safetensors`), the tokenizer,
and `base_model.json`: the base model's folder (relative to the adapter's folder, and absolute) and
that folder's fingerprint when the adapter was trained. `models.loading` checks the base against that
fingerprint, loads it and merges the adapter in, so an adapter folder loads as a plain model: every
hook, lens and family path finds the same modules as in a full fine-tune. A base can itself be an
adapter folder (a chain of stages), loaded the same way.
"""
import os
from pathlib import Path

from runner.errors import UserError
from runner.files import atomic_write_json, read_json

ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_RECORD = "adapter_config.json", "adapter_model.safetensors", "base_model.json"


def is_adapter(path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def write_base_record(folder: Path, final_folder: Path, base: Path, fingerprint: str) -> None:
    """Name `base` in `folder` (being written; it ends up at `final_folder`, which the relative path starts from)."""
    base = Path(base).resolve()
    atomic_write_json(folder / BASE_RECORD, {"relative_path": os.path.relpath(base, Path(final_folder).resolve()),
                                             "path": str(base), "fingerprint": fingerprint})


def base_candidates(folder: Path) -> tuple:
    """(the folders where the base may be, in order; its fingerprint at training time)."""
    record_file = folder / BASE_RECORD
    if not record_file.is_file():
        raise UserError(f"{folder} holds a LoRA adapter but no {BASE_RECORD} naming the model it was trained on; "
                        "train it with this toolkit (finetune with peft=lora) or merge it into a full model")
    try:
        record = read_json(record_file)
        return [folder / record["relative_path"], Path(record["path"])], record["fingerprint"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{record_file}: expected relative_path, path and fingerprint; rerun the fine-tune") from None


def merge_adapter(model, folder: Path):
    """`model` (the adapter's base, loaded) with the adapter's weights merged in: a plain transformers model."""
    from peft import PeftModel
    return PeftModel.from_pretrained(model, folder).merge_and_unload()
