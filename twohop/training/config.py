"""Typed training configs: the trainer's hyper-parameters, the data a fine-tune reads, and the
reference repo's experiment YAML as a layer of those keys.

`TrainingConfig` is what `trainer.train` reads; `AdapterTrainingConfig` adds LoRA / QLoRA through
`peft` (read by `twohop.training.lora`; a config without these keys, the tiny model's pretraining,
trains every parameter); `FinetuneConfig` adds what a fine-tuning sub-job trains on and evaluates
(its own lists, or an experiment YAML in the reference format whose keys are applied between the
recipe and `--set`). Every key is read by the code that runs or refused.
"""
from dataclasses import dataclass
from typing import Literal, Optional

from runner import config as typed
from runner.config import option
from runner.errors import UserError
from twohop.training.experiment import experiment_layer


@dataclass
class TrainingConfig:
    lr: float = option(1e-5, "peak learning rate", minimum=0.0)
    lr_scheduler: Literal["linear", "constant", "cosine"] = option(
        "linear", "decay after warm-up: linear to 0, constant, or cosine to 0")
    epochs: int = option(1, "passes over the training rows", minimum=1)
    max_steps: int = option(0, "stop after this many optimizer steps (0: run every epoch)", minimum=0)
    batch_size: int = option(64, "rows (or packed sequences) per batch and rank", minimum=1)
    gradient_accumulation_steps: int = option(1, "batches per optimizer step", minimum=1)
    warmup_ratio: float = option(0.03, "share of the steps spent warming the learning rate up", minimum=0.0,
                                 maximum=1.0)
    weight_decay: float = option(0.0, "AdamW weight decay of matrices", minimum=0.0)
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: no clipping)", minimum=0.0)
    max_length: int = option(512, "longest training row in tokens (a longer row is an error)", minimum=8)
    packing: bool = option(False, "concatenate rows into sequences of max_length tokens")
    bf16: Literal["auto", True, False] = option("auto", "bf16 mixed precision; auto: on CUDA devices that support it")
    gradient_checkpointing: Literal["auto", True, False] = option(
        "auto", "recompute each decoder layer's activations in the backward pass (far less memory, about a third "
                "more compute); auto: on for models over 1B parameters on a GPU")
    eval_every_steps: int = option(0, "evaluate every N steps (0: at the start and after each epoch)", minimum=0)
    save_every_steps: int = option(200, "checkpoint every N steps, for resuming (0: never)", minimum=0)
    log_every_steps: int = option(10, "log the training loss every N steps", minimum=1)
    aux_loss_type: Literal["", "logit", "cosine"] = option(
        "", "activation supervision of the bridge entity (Exp. 2b): logit lens or cosine to its embedding")
    aux_loss_coef: float = option(0.0, "weight of the auxiliary loss (needs aux_loss_type)", minimum=0.0)
    aux_loss_target_layer: int = option(-1, "decoder layer whose output is supervised (-1: the middle one)",
                                        minimum=-1)
    wandb: bool = option(False, "log to Weights & Biases (the wandb package must be installed)")


@dataclass
class AdapterTrainingConfig(TrainingConfig):
    peft: Literal["", "lora", "qlora"] = option(
        "", "'': train the weights themselves; lora: train a LoRA adapter (model/ holds the adapter); qlora: the "
            "same over a 4-bit base (bitsandbytes, CUDA). LoRA usually wants a higher lr than full fine-tuning")
    lora_rank: int = option(8, "rank r of each LoRA update", minimum=1)
    lora_alpha: float = option(16.0, "LoRA scaling: the update is multiplied by lora_alpha / lora_rank", minimum=0.0)
    lora_dropout: float = option(0.05, "dropout on the LoRA branch's input while training", minimum=0.0, maximum=1.0)
    lora_target_modules: list[str] = option([], "names of the linear modules adapted, e.g. [q_proj, v_proj] ([]: the "
                                                "model family's attention and MLP projections)")
    merge: bool = option(False, "also save the base with the adapter merged in, as a full model in model_merged/")


@dataclass
class TrainEntry:
    name: str = option("", "the file's name in logs")
    dataset_file: str = option("", "JSONL records: relative to the data prerequisite's folder, or absolute")
    subsample: int = option(0, "train on a seeded sample of this many rows (0: use train_fraction)", minimum=0)
    train_fraction: Optional[float] = option(None, "share of this file's rows trained on (default: the config's)",
                                             minimum=0.0, maximum=1.0)


@dataclass
class EvalEntry:
    name: str = option("", "the set's name in metrics.jsonl")
    dataset_file: str = option("", "JSONL records: relative to the data prerequisite's folder, or absolute")
    subsample: int = option(0, "evaluate the first N rows (0: eval_subsample)", minimum=0)
    shuffled_of: str = option("", "for a set of shuffled answers: the true set's name, to track the loss gap")


@dataclass
class EvaluationEntry:
    """One entry of a reference experiment's `evaluations:` block, run after training."""
    dataset_file: str = option("", "JSONL records with the gold reply")
    metric_name: str = option("", "the metric's name in metrics.json (e.g. acc_2hop_0shot)")
    force_cot: bool = option(False, "ask step by step (the study's CoT system prompt) and grade the final answer")
    force_no_cot: bool = option(False, "ask for the answer alone (the study's no-CoT system prompt)")
    few_shots_path: str = option("", "JSONL records prepended as earlier turns")
    max_new_tokens: int = option(0, "generation length (0: 24 without CoT, 96 with)", minimum=0)
    subsample: int = option(0, "evaluate the first N rows (0: all)", minimum=0)


@dataclass
class FinetuneConfig(AdapterTrainingConfig):
    train_fraction: float = option(1.0, "share of each training file used, seeded (an entry's own wins)",
                                   minimum=0.0, maximum=1.0)
    eval_subsample: int = option(256, "rows per eval set for the loss evaluations during training", minimum=1)
    layer_range: str = option("", "'s-e': train decoder layers s..e-1 only (end-exclusive; with peft, adapt "
                                      "only those); '': all parameters")
    model_name_or_path: str = option("", "the model an experiment file was written for: it must name --model's "
                                         "model (its folder name or the last part of a hub name)")
    train_datasets: list[TrainEntry] = option([], "the training files")
    eval_datasets: list[EvalEntry] = option([], "sets whose loss and accuracy are tracked during training")
    evaluations: list[EvaluationEntry] = option([], "generation evaluations after training (reference format)")
    experiment_config: str = option("", "an experiment YAML in the reference format (path from the working "
                                        "directory): its keys replace the recipe's, --set replaces its",
                                    path=True, config_file=experiment_layer)
    data_root: str = option("", "where an experiment YAML's relative file names start ('': the nearest folder "
                                "above the YAML holding datasets/, as the reference's repository root; then the "
                                "YAML's folder)", path=True)


def check_fraction(fraction, where: str = "") -> None:
    if not 0 < fraction <= 1:
        raise UserError(f"{where}train_fraction {fraction!r}: must be in (0, 1]")


def check_training(config: dict) -> None:
    """Checks across keys, before anything runs."""
    if config["aux_loss_type"] and config["packing"]:
        raise UserError("aux_loss_type needs packing=false (the supervised position is per row)")
    if config["aux_loss_type"] and not config["aux_loss_coef"]:
        raise UserError(f"aux_loss_type={config['aux_loss_type']} with aux_loss_coef=0 trains without it; "
                        "set aux_loss_coef > 0 or aux_loss_type=''")
    if config["aux_loss_coef"] and not config["aux_loss_type"]:
        raise UserError("aux_loss_coef > 0 needs aux_loss_type (logit or cosine)")
    if config["wandb"]:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("wandb=true but the wandb package is not installed; pip install wandb or drop it") from None


def check_adapter(config: dict, model=None) -> None:
    """The adapter keys: set only with peft; then checked against the model (twohop.training.lora)."""
    if config["peft"]:
        from twohop.training.lora import check_for_model
        check_for_model(config, model)
    else:
        plain = typed.defaults(TrainingConfig)
        for key, default in typed.defaults(AdapterTrainingConfig).items():
            if key not in plain and config[key] != default:
                value = str(config[key]).lower() if isinstance(config[key], bool) else config[key]
                raise UserError(f"{key}={value} applies to an adapter, but peft is ''; set peft=lora or drop it")


def check_finetune(config: dict, model=None) -> None:
    check_training(config)
    check_adapter(config, model)
    check_fraction(config["train_fraction"])
    for entry in config["train_datasets"]:
        if entry["train_fraction"] is not None:
            check_fraction(entry["train_fraction"], f"train dataset {entry['name']!r}: ")
    if config["layer_range"]:
        from twohop.training.experiment import parse_layer_range
        parse_layer_range(config["layer_range"], num_layers=10**6)  # the layer count is checked at load time
    for entry in config["evaluations"]:
        if entry["force_cot"] and entry["force_no_cot"]:
            raise UserError(f"evaluation {entry['metric_name']!r}: force_cot and force_no_cot are both set")
        if not entry["dataset_file"] or not entry["metric_name"]:
            raise UserError("each entry of evaluations needs dataset_file and metric_name")
    wanted = config["model_name_or_path"]
    if wanted and model is not None and _last_part(wanted) not in (_last_part(model.name), model.path.name):
        raise UserError(f"model_name_or_path {wanted!r} (from the experiment config) is not the run's model "
                        f"{model.name!r}; pass --model {_last_part(wanted)} (a folder under W/transformers/) or "
                        f"--model {wanted.rstrip('/')} (a Hugging Face name), or delete the key")


def _last_part(model_name: str) -> str:
    """meta-llama/Llama-3.1-8B-Instruct@main -> Llama-3.1-8B-Instruct: what a model name and a folder share."""
    return model_name.split("@")[0].rstrip("/").split("/")[-1]
