"""Per-architecture facts, kept in one place so every job treats Llama-3, Qwen2.5 and the tiny
model the same way: where the decoder layers, final norm, embeddings and unembedding live, and
which dtype to use on an accelerator, and which linear modules LoRA adapts by default.

Loss masking needs no per-model marker: it is derived from each tokenizer's own chat template
(the rendered prompt with `add_generation_prompt=True` is a prefix of the rendered conversation).
"""
from dataclasses import dataclass
from functools import reduce

import torch

from runner.errors import UserError


@dataclass(frozen=True)
class ModelFamily:
    model_types: tuple
    body: str  # attribute path of the decoder stack without the LM head
    layers: str  # attribute path of the decoder layer list
    final_norm: str
    embeddings: str
    unembedding: str
    attention: str  # attribute of a decoder layer holding its self-attention module
    attention_output: str  # attribute of the attention module projecting the concatenated head outputs
    mlp: str  # attribute of a decoder layer holding its MLP
    accelerator_dtype: torch.dtype
    lora_targets: tuple  # names of the linear modules LoRA adapts by default (attention and MLP)
    # attributes of a decoder layer holding the norms whose input is the residual stream the attention and the
    # MLP read ("": the family normalises elsewhere, e.g. only after each block; edge attribution refuses it)
    attention_norm: str = ""
    mlp_norm: str = ""


LLAMA_LIKE = dict(body="model", layers="model.layers", final_norm="model.norm", embeddings="model.embed_tokens",
                  unembedding="lm_head", attention="self_attn", attention_output="o_proj",
                  mlp="mlp", accelerator_dtype=torch.bfloat16)
PRE_NORMS = dict(attention_norm="input_layernorm", mlp_norm="post_attention_layernorm")
FAMILIES = (
    ModelFamily(("llama", "mistral", "qwen2", "qwen3", "gemma"), **LLAMA_LIKE, **PRE_NORMS,
                lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    ModelFamily(("gemma2", "gemma3_text", "olmo2"), **LLAMA_LIKE,  # norms after the blocks too: no edge attribution
                lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    ModelFamily(("phi3",), **LLAMA_LIKE, **PRE_NORMS, lora_targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    ModelFamily(("gpt2",), body="transformer", layers="transformer.h", final_norm="transformer.ln_f",
                embeddings="transformer.wte", unembedding="lm_head", attention="attn", attention_output="c_proj",
                mlp="mlp", accelerator_dtype=torch.float32, lora_targets=("c_attn", "c_proj", "c_fc"),
                attention_norm="ln_1", mlp_norm="ln_2"),
)


def family_of(config) -> ModelFamily:
    return family_named(config.model_type)


def family_named(model_type, where: str = "model type") -> ModelFamily:
    """The family of a config's `model_type`; `where` names it in the error (e.g. the config file)."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = sorted(t for f in FAMILIES for t in f.model_types)
    raise UserError(f"{where} {model_type!r} is not supported yet; supported: "
                    f"{', '.join(supported)} (add it to models/families.py)")


def _get(model, path: str):
    return reduce(getattr, path.split("."), model)


def decoder_body(model):
    return _get(model, family_of(model.config).body)


def decoder_layers(model):
    return _get(model, family_of(model.config).layers)


def final_norm(model):
    return _get(model, family_of(model.config).final_norm)


def input_embeddings(model):
    return _get(model, family_of(model.config).embeddings)


def unembedding(model):
    return _get(model, family_of(model.config).unembedding)


def unembed(model, hidden_states) -> torch.Tensor:
    """Logits for the given final hidden states (only those: the LM head is costly over a large vocabulary)."""
    logits = unembedding(model)(hidden_states)
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma-2 caps its logits
    return cap * torch.tanh(logits / cap) if cap else logits


def preferred_dtype(config, device) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls are slow there for tiny models); the family's dtype on CUDA."""
    if torch.device(device).type == "cuda":
        return family_of(config).accelerator_dtype
    return torch.float32
