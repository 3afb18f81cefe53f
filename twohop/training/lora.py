"""LoRA / QLoRA fine-tuning through `peft`: checks before anything runs, the adapter's config from the
run's keys (`AdapterTrainingConfig`), attaching it to the base, and saving what was trained.

peft injects its LoRA layers into the transformers model itself, and the trainer keeps training that
model: the reply loss, the auxiliary losses and every family path (`models.families`) see the usual
modules, and only the adapter's parameters train. `layer_range` puts adapters on those decoder layers
only (peft's `layers_to_transform`). The run's `model/` holds the adapter in the format
`models.adapters` describes, which every job loads like a full model.
"""
import importlib.util
from pathlib import Path

import torch

from models.adapters import is_adapter, write_base_record
from models.families import family_of
from models.loading import adapter_base, check_model_folder, load_model, model_fingerprint
from runner.errors import UserError
from runner.files import atomic_directory


def mode(config: dict) -> str:
    """'', 'lora' or 'qlora'; '' also for a config without adapter keys (the tiny model's pretraining)."""
    return config.get("peft", "")


def check_for_model(config: dict, model=None) -> None:
    """Before anything runs: qlora only where it can run, and the target modules present in `model` (a
    models.ModelRef) when its folder exists (the trainer checks them again on the base it loads)."""
    if config["peft"] == "qlora":
        check_qlora(model)
    if model is not None and model.path.is_dir():
        target_modules(skeleton(model.path), config["lora_target_modules"])


def require_cuda() -> None:
    """4-bit weights need a CUDA device on the machine that trains (checked there: a SLURM job's node,
    not the login node that submits it)."""
    if not torch.cuda.is_available():
        raise UserError("peft=qlora: 4-bit base weights (bitsandbytes) need a CUDA device and none is visible here; "
                        "use peft=lora, or run on a machine with a GPU (--launcher slurm checks on the job's node)")


def check_qlora(model=None) -> None:
    """What qlora needs wherever the run trains: the bitsandbytes package, and a base that is not an adapter."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("peft=qlora needs the bitsandbytes package, which is not installed: pip install bitsandbytes "
                        "(or use peft=lora)")
    if model is not None and is_adapter(model.path):
        raise UserError(f"peft=qlora: --model {model.name} is an adapter, which does not merge exactly into 4-bit "
                        "weights; train on its merged model (merge=true) or use peft=lora")


def skeleton(folder: Path):
    """The model in `folder` (for an adapter, its base's) on the meta device: its modules, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM
    while is_adapter(folder):
        folder = adapter_base(folder)
    check_model_folder(folder)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, local_files_only=True))


def linear_modules(model) -> dict:
    """Last name part -> whether that module is a transformers Conv1D (GPT-2's transposed linear layers)."""
    from transformers.pytorch_utils import Conv1D
    return {name.rsplit(".", 1)[-1]: isinstance(module, Conv1D) for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D))}


def target_modules(model, requested: list) -> list:
    """The modules to adapt: `requested`, or the family's default; one that the model lacks is refused."""
    targets = list(requested) or list(family_of(model.config).lora_targets)
    available = linear_modules(model)
    for target in targets:
        if target not in available:
            raise UserError(f"lora_target_modules: {target!r} is not a linear module of this {model.config.model_type} "
                            f"model; its linear modules: {', '.join(sorted(available))}")
    return targets


def lora_config(model, config: dict, layers):
    """peft's LoraConfig for `model`; `layers` (a range of decoder layers, or None for all) bounds where it goes."""
    from peft import LoraConfig
    targets = target_modules(model, config["lora_target_modules"])
    transposed = linear_modules(model)
    pattern = family_of(model.config).layers.rsplit(".", 1)[-1]  # the layer list's name: layers, h
    bounded = {"layers_to_transform": list(layers), "layers_pattern": pattern} if layers is not None else {}
    return LoraConfig(r=config["lora_rank"], lora_alpha=config["lora_alpha"], lora_dropout=config["lora_dropout"],
                      target_modules=targets, fan_in_fan_out=any(transposed[t] for t in targets), bias="none",
                      task_type="CAUSAL_LM", **bounded)


def load_base(path, config: dict, device):
    """(model, tokenizer) the adapter trains over: float32, or for qlora 4-bit weights on the CUDA `device`."""
    if mode(config) == "qlora":
        require_cuda()
        check_qlora()
        return load_model(path, device, quantize_4bit=True)
    return load_model(path, dtype=torch.float32)


def attach(model, config: dict, layers, checkpoint: Path = None):
    """A PeftModel over `model` whose LoRA weights train: fresh, or the checkpoint's adapter when resuming."""
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
    if mode(config) == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if checkpoint is not None:
        return PeftModel.from_pretrained(model, checkpoint, is_trainable=True)
    return get_peft_model(model, lora_config(model, config, layers))


def name_base(folder: Path, final_folder: Path, base: Path) -> None:
    """Record in the adapter `folder` (being written, to end up at `final_folder`) the base it was trained on."""
    write_base_record(folder, final_folder, base, model_fingerprint(base))


def save_merged(adapter_folder: Path, folder: Path, device) -> None:
    """The adapter merged into its base, loaded as every job loads it, saved as a full model."""
    model, tokenizer = load_model(adapter_folder, device)
    with atomic_directory(folder) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
