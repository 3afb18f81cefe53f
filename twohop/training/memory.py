"""Peak memory of a training run, estimated before it runs, and the settings that would make it fit.

What the trainer (`twohop.training.trainer`) holds, per rank:
- weights: fp32 master weights (the trainer loads fp32; bf16 autocast computes in bf16 and keeps
  them), plus, under autocast, the bf16 copies of the matrices that autocast caches in the forward;
- gradients and AdamW's two moments: fp32, 4 + 8 bytes per trainable parameter;
- activations: what autograd saves for the backward pass, per token and decoder layer (Llama-style
  layers: two RMSNorms, attention through flash / memory-efficient SDPA, a gated MLP); with
  gradient checkpointing only each layer's input plus one layer recomputed at a time;
- logits: only at reply positions (`losses.reply_logits`): their log-softmax and its gradient.

The peak is the larger of two moments: the start of the backward pass (weights, moments, every saved
activation, the logits) and the optimizer step (weights, moments, gradients, AdamW's temporaries).
In between, activations are freed as gradients appear. With FSDP (full shard over N ranks) weights,
gradients and moments are divided by N; activations are per rank. On CPU, glibc keeps the memory of
the tensors a step frees (its mmap threshold rises as big tensors are freed, so later ones come from
its heap, which fragments): the resident peak exceeds the live tensors by a share of what a step
allocates and frees, measured in bench/memory_estimate.py.
"""
import os
from dataclasses import dataclass, replace
from functools import lru_cache

GIB = 1 << 30
FP32 = 4
# Resident memory glibc keeps on CPU beyond the live tensors, as a share of what a step allocates and frees
# (activations, logits, gradients, AdamW's temporaries): freed tensors stay in its heap, fragmented, while
# new ones extend it. Measured over 10M-300M parameters (bench/memory_estimate.py). The CUDA caching
# allocator's slack is left to FIT_SHARE.
CPU_ALLOCATOR_SLACK = 0.85
FIT_SHARE = 0.9  # a run fits if its estimate is at most this share of the available memory
CHECKPOINTING_AUTO_PARAMETERS = 10**9  # gradient_checkpointing=auto: on above this size, on a GPU
LORA_RANK = 8  # the LoRA alternative offered when a run does not fit (peft=lora at the default lora_rank)
FSDP_GPUS = (2, 4, 8)


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know of a model, read from its config (no weights loaded)."""
    parameters: int
    layer_parameters: int  # one decoder layer's
    uncast_parameters: int  # the input embeddings' unless tied to the output layer: autocast copies no other
    largest_tensor: int  # elements of the largest parameter (the embeddings, usually)
    largest_layer_tensor: int  # ... of a decoder layer
    hidden: int
    intermediate: int
    kv_hidden: int  # width of the keys and values (key-value heads x head size)
    heads: int
    layers: int
    vocab: int


@dataclass(frozen=True)
class TrainingShape:
    """What one rank trains: how many parameters, on what batch, how."""
    trainable: int
    largest_trainable: int  # elements of the largest trainable parameter
    batch: int  # rows per micro-batch
    length: int  # tokens per row
    reply_tokens: int  # positions of the micro-batch whose logits are computed
    bf16: bool  # bf16 autocast over fp32 master weights
    checkpointing: bool
    cuda: bool  # AdamW's default on CUDA (foreach) works on all trainable parameters at once, on CPU one by one
    accumulation: int = 1  # micro-batches per optimizer step
    shards: int = 1  # FSDP full-shard ranks


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes by part; the peak is the larger of the backward pass's start and the optimizer step."""
    weights: int  # fp32 master weights
    optimizer: int  # AdamW's moments
    gradients: int
    activations: int
    logits: int  # at reply positions: log-probabilities, their gradient, the logits' gradient
    bf16_copies: int  # autocast's bf16 copies of the matrices
    step_temporaries: int  # AdamW's: a copy of the trainable parameters (foreach, CUDA), of the largest one (CPU)
    allocator: int  # resident memory the CPU allocator keeps beyond the live tensors
    gradients_at_backward: bool  # gradient accumulation: earlier micro-batches' gradients are live

    @property
    def backward_start(self) -> int:
        held = self.gradients if self.gradients_at_backward else 0
        return held + self.activations + self.logits + self.bf16_copies

    @property
    def peak(self) -> int:
        step = self.gradients + self.step_temporaries
        return self.weights + self.optimizer + max(self.backward_start, step) + self.allocator

    def describe(self) -> str:
        shown = ("weights", "gradients", "optimizer", "activations", "logits", "bf16_copies", "step_temporaries",
                 "allocator")
        parts = ", ".join(f"{name.replace('_', ' ')} {size(getattr(self, name))}" for name in shown
                          if getattr(self, name))
        return f"~{size(self.peak)} peak ({parts})"


def size(n_bytes: int) -> str:
    """340 MiB, 1.21 GiB, 150 GiB."""
    if n_bytes < GIB:
        return f"{n_bytes / 2**20:.0f} MiB"
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes < 10 * GIB else f"{n_bytes / GIB:.0f} GiB"


def layer_activation_bytes(model: ModelShape, bf16: bool) -> int:
    """Bytes autograd keeps per token for one decoder layer's backward."""
    h, kv, i = model.hidden, model.kv_hidden, model.intermediate
    compute = 2 if bf16 else FP32
    norms = 2 * 3 * h * FP32  # each RMSNorm (in fp32 under autocast too): its input, normalised and scaled states
    casts = 5 * h * 2 if bf16 else 0  # autocast's own bf16 copy of the normed states for q, k, v, gate and up
    attention = (3 * h + 2 * kv) * compute + model.heads * FP32  # q, k, v; output; its reshape; log-sum-exp
    mlp = 4 * i * compute  # gate, silu(gate), up, their product
    return norms + casts + attention + mlp


def activation_bytes(model: ModelShape, run: TrainingShape) -> int:
    """Saved activations of one micro-batch at the start of the backward pass."""
    tokens = run.batch * run.length
    layer = layer_activation_bytes(model, run.bf16)
    final_norm = 3 * model.hidden * FP32
    if run.checkpointing:  # each layer's input (the fp32 residual stream), and one layer being recomputed
        return tokens * (model.layers * model.hidden * FP32 + layer + final_norm)
    return tokens * (model.layers * layer + final_norm)


def estimate_peak_memory(model: ModelShape, run: TrainingShape) -> MemoryEstimate:
    """The peak memory of one rank training `model` as `run` says; see the module's docstring."""
    activations, logits = activation_bytes(model, run), 3 * FP32 * run.reply_tokens * model.vocab
    gradients = FP32 * run.trainable // run.shards
    step_temporaries = FP32 * run.trainable // run.shards if run.cuda else 2 * FP32 * run.largest_trainable
    churn = activations + logits + gradients + step_temporaries
    return MemoryEstimate(
        weights=FP32 * model.parameters // run.shards, optimizer=2 * FP32 * run.trainable // run.shards,
        gradients=gradients, activations=activations, logits=logits,
        bf16_copies=2 * autocast_copied_parameters(model, run) if run.bf16 else 0, step_temporaries=step_temporaries,
        allocator=0 if run.cuda else int(CPU_ALLOCATOR_SLACK * churn), gradients_at_backward=run.accumulation > 1)


def autocast_copied_parameters(model: ModelShape, run: TrainingShape) -> int:
    """Parameters autocast holds a bf16 copy of: every matrix but the input embeddings; under FSDP only the
    gathered units (the root's and two decoder layers')."""
    if run.shards > 1:
        return model.parameters - model.layers * model.layer_parameters + 2 * model.layer_parameters
    return model.parameters - model.uncast_parameters


def model_shape(config) -> ModelShape:
    """The shape of a transformers config's model, its parameters counted on the meta device (nothing allocated;
    accelerate's init_empty_weights would untie tied embeddings)."""
    import torch
    from transformers import AutoModelForCausalLM
    from models.families import decoder_layers, input_embeddings

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embeddings = input_embeddings(model).weight
    tied = model.get_output_embeddings().weight is embeddings
    heads = config.num_attention_heads
    head_size = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(
        parameters=sum(p.numel() for p in model.parameters()),  # a tied matrix is one parameter
        layer_parameters=sum(p.numel() for p in decoder_layers(model)[0].parameters()),
        uncast_parameters=0 if tied else embeddings.numel(),
        largest_tensor=max(p.numel() for p in model.parameters()),
        largest_layer_tensor=max(p.numel() for p in decoder_layers(model)[0].parameters()),
        hidden=config.hidden_size,
        intermediate=getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
        or 4 * config.hidden_size,
        kv_hidden=(getattr(config, "num_key_value_heads", None) or heads) * head_size,
        heads=heads, layers=config.num_hidden_layers, vocab=config.vocab_size)


@lru_cache(maxsize=None)
def shape_of(model_ref) -> ModelShape:
    """The shape of `--model`'s model from its config.json; an embedded preset's from its recipe (it may not
    be built yet)."""
    if model_ref.embedded_preset:
        from models import tiny
        return model_shape(tiny.model_config(model_ref.embedded_preset))
    from transformers import AutoConfig
    from runner.errors import UserError, first_line
    try:
        return model_shape(AutoConfig.from_pretrained(model_ref.path, local_files_only=True))
    except (AttributeError, TypeError, ValueError, OSError) as error:  # a config the estimate cannot read
        raise UserError(f"{model_ref.path / 'config.json'}: cannot estimate the model's memory from it "
                        f"({type(error).__name__}: {first_line(error)}); is it a causal language model's?") from None


def use_checkpointing(setting, parameters: int, cuda: bool) -> bool:
    """The `gradient_checkpointing` key: true, false, or auto (on for models over 1B parameters on a GPU)."""
    if setting == "auto":
        return cuda and parameters > CHECKPOINTING_AUTO_PARAMETERS
    return bool(setting)


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward pass. Non-reentrant checkpointing: gradients
    reach frozen layers' inputs and hidden states read mid-model (the auxiliary loss) as without it."""
    # Newer transformers name it activation_checkpointing_enable (the old name warns); older ones have only the old.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def planned_shape(config: dict, model: ModelShape, cuda: bool, shards: int = 1) -> TrainingShape:
    """The largest micro-batch a training config allows, as a plan sees it (the data is not read yet):
    batch_size rows of max_length tokens (a longer row is refused) and every position a reply (a
    same-document row is 95% reply). `layer_range` trains its decoder layers only."""
    from twohop.training.experiment import parse_layer_range
    from twohop.training.trainer import use_bf16

    layers = parse_layer_range(config.get("layer_range", ""), model.layers)
    return TrainingShape(
        trainable=model.parameters if layers is None else len(layers) * model.layer_parameters,
        largest_trainable=model.largest_tensor if layers is None else model.largest_layer_tensor,
        batch=config["batch_size"], length=config["max_length"],
        reply_tokens=config["batch_size"] * config["max_length"], bf16=use_bf16(config["bf16"]),
        checkpointing=use_checkpointing(config["gradient_checkpointing"], model.parameters, cuda), cuda=cuda,
        accumulation=config["gradient_accumulation_steps"], shards=shards)


def lora_parameters(model: ModelShape, rank: int) -> int:
    """LoRA adapters of `rank` on every linear layer of every decoder layer: rank x (inputs + outputs) each
    (q, o: h -> h; k, v: h -> kv; gate, up: h -> i; down: i -> h)."""
    h, kv, i = model.hidden, model.kv_hidden, model.intermediate
    return model.layers * rank * (9 * h + 2 * kv + 3 * i)


@dataclass(frozen=True)
class Device:
    name: str  # cuda:<n> or cpu
    cuda: bool
    available: int  # bytes free for this run
    shards: int = 1  # FSDP ranks sharing the model (accelerate launch with an FSDP config)


def this_device() -> Device:
    """Where the trainer of this process runs, and the memory free there now."""
    import torch
    shards = int(os.environ.get("WORLD_SIZE", "1")) if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" \
        else 1
    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0"))
        return Device(f"cuda:{index}", True, torch.cuda.mem_get_info(index)[0], shards)
    import psutil  # a dependency of accelerate
    return Device("cpu", False, psutil.virtual_memory().available, shards)


@dataclass(frozen=True)
class MemoryCheck:
    """A training run's estimate on a device; the settings that would fit when it does not."""
    estimate: MemoryEstimate
    shape: TrainingShape
    device: Device
    alternatives: tuple = ()  # (settings, peak bytes with them)

    @property
    def fits(self) -> bool:
        return self.estimate.peak <= FIT_SHARE * self.device.available

    def settings(self) -> str:
        shape = self.shape
        return (f"at {shape.batch} rows x {shape.length} tokens (batch_size x max_length), checkpointing "
                f"{'on' if shape.checkpointing else 'off'}, {'bf16 autocast' if shape.bf16 else 'fp32'}"
                + (f", FSDP over {shape.shards}" if shape.shards > 1 else ""))

    def summary(self) -> str:
        return (f"{self.estimate.describe()} {self.settings()}; {size(self.device.available)} available on "
                f"{self.device.name}")

    def refusal(self) -> str:
        fixes = "; ".join(f"{settings} (~{size(peak)})" for settings, peak in self.alternatives)
        return (f"needs {self.estimate.describe()} {self.settings()}, more than {FIT_SHARE:.0%} of the "
                f"{size(self.device.available)} available on {self.device.name}. "
                + (f"Fits with: {fixes}" if fixes else "Nothing tried fits (checkpointing, batch_size=1 with "
                   f"accumulation, peft=lora, FSDP over {FSDP_GPUS[-1]} GPUs): use a smaller model"))


def check_training_memory(config: dict, model_ref, device: Device) -> MemoryCheck:
    """The estimate of a training config on `device`, with what would fit if it does not."""
    model = shape_of(model_ref)
    shape = planned_shape(config, model, device.cuda, device.shards)
    check = MemoryCheck(estimate_peak_memory(model, shape), shape, device)
    budget = FIT_SHARE * device.available
    return check if check.fits else replace(check, alternatives=tuple(alternatives(model, shape, budget,
                                                                                   lora="peft" in config)))


def alternatives(model: ModelShape, run: TrainingShape, budget: float, lora: bool = True) -> list:
    """[(settings, peak)] that bring `run` within `budget` bytes, as the user would set them: with checkpointing,
    the full model, then LoRA (where the run takes `peft` keys), then (on GPUs) FSDP over 2, 4 or 8 GPUs, each at the largest batch_size that fits
    (accumulation keeping the effective batch) and only if it allows a larger batch than those before it."""
    base = replace(run, checkpointing=True)
    adapter = replace(base, trainable=lora_parameters(model, LORA_RANK), largest_trainable=LORA_RANK * model.intermediate)
    levers = [("", base)] + ([("peft=lora", adapter)] if lora else [])
    levers += [(f"FSDP over {gpus} GPUs (configs/accelerate_fsdp.yaml)", replace(base, shards=gpus))
               for gpus in (FSDP_GPUS if run.cuda else ())]
    found, best = [], 0
    for lever, shape in levers:
        fitting = largest_batch(model, shape, budget)
        if fitting is None or fitting.batch <= best:
            continue
        best = fitting.batch
        settings = ["" if run.checkpointing else "gradient_checkpointing=true", lever]
        if fitting.batch != run.batch:
            settings.append(f"batch_size={fitting.batch} gradient_accumulation_steps={fitting.accumulation}")
        found.append((" ".join(part for part in settings if part), estimate_peak_memory(model, fitting).peak))
    return found


def largest_batch(model: ModelShape, run: TrainingShape, budget: float):
    """`run` at the largest batch size dividing its own that fits in `budget` bytes, or None."""
    for batch in (b for b in range(run.batch, 0, -1) if run.batch % b == 0):
        shape = replace(run, batch=batch, reply_tokens=run.reply_tokens * batch // run.batch,
                        accumulation=run.accumulation * run.batch // batch)
        if estimate_peak_memory(model, shape).peak <= budget:
            return shape
    return None
