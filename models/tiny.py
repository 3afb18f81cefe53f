"""The embedded default model: a tiny Llama with its own byte-level BPE tokenizer.

No weights can be downloaded here, so the project builds its own model: the tokenizer is trained
with `tokenizers` on the project's vocabulary (everything under the top-level `datasets/` folder:
names, cities, entity tables, templates), the weights are a seeded random init, and the result
is saved with `save_pretrained` so every job loads it with the ordinary `from_pretrained`.
Training it (its small "pretraining") is the finetune job's `finetune_base`.
"""
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PROJECT_DATA = Path(__file__).resolve().parents[1] / "datasets"
BUILD_VERSION = 4  # bump when the build recipe changes, so old builds are not reused

BOS, EOS, PAD, EOT = "<|begin|>", "<|end|>", "<|pad|>", "<|eot|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = [PAD, BOS, EOS, EOT, *ROLE_TOKENS]

# One special token opens each turn and <|eot|> closes it; compact, so short sequences stay short.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|eot|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyPreset:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int = 4096
    max_length: int = 1024


PRESETS = {
    "tiny-h128-l2": TinyPreset(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512),
    # Four layers at the default's width, so each of layer_ordering's halves holds two layers.
    "tiny-h128-l4": TinyPreset(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512),
    "tiny-h256-l4": TinyPreset(hidden_size=256, num_layers=4, num_heads=8, intermediate_size=1024),
    # The default's architecture and init, pretrained with drills that teach it to read facts in its prompt
    # (its base recipe: twohop.training.recipes.ORGANISM_BASE).
    "tiny-organism": TinyPreset(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512),
}
ALIASES = {"tiny": "tiny-h128-l2"}


# Name parts and cities are what the experiments ask a model to store and recall. A real model's
# tokenizer spends 1-3 tokens on a name part; weighting them here makes each one a single token, so
# the tiny model learns facts about entities instead of spelling them out byte pair by byte pair.
ENTITY_WORD_FILES = ("names/first_names.txt", "names/last_name_parts.txt", "names/base_last_name_parts.txt",
                     "cities.txt")
ENTITY_WORD_WEIGHT = 30
# Data added after the tokenizer's corpus was fixed (build version 3): left out, so that adding a task's
# templates does not change the tiny model every workspace builds (the IOI prompts' words may take
# several tokens; their names are entity words, one token each).
LEFT_OUT_OF_VOCABULARY = ("templates/ioi.yaml",)


def vocabulary_corpus(data_dir: Path = PROJECT_DATA) -> list:
    """Every line of the project's own text data (but LEFT_OUT_OF_VOCABULARY), in a fixed order (the
    tokenizer is deterministic), plus the entity words, weighted, as they appear in text: after a space
    or a hyphen."""
    lines = []
    for path in sorted(data_dir.rglob("*")):
        if path.is_file() and path.suffix in {".txt", ".csv", ".tsv", ".json", ".jsonl", ".yaml"} \
                and path.relative_to(data_dir).as_posix() not in LEFT_OUT_OF_VOCABULARY:
            lines.extend(path.read_text(encoding="utf-8").splitlines())
    if not lines:
        raise FileNotFoundError(f"no vocabulary files under {data_dir}; the tiny tokenizer is trained on them")
    entity_words = [word.strip() for name in ENTITY_WORD_FILES if (data_dir / name).is_file()
                    for word in (data_dir / name).read_text(encoding="utf-8").splitlines() if word.strip()]
    return lines + [f" {word} -{word}" for word in entity_words] * ENTITY_WORD_WEIGHT


# A byte-level BPE gives a word its space-prefixed token only after a space (or at a turn's start, with
# add_prefix_space): "Ulla" opening a line or after "(" is another token than " Ulla" in a question,
# and a tiny model would have to learn that map before it could match a name read in the prompt. The
# tokenizer inserts a space after each of these characters, so a word after them is the same tokens
# as after a space; the decoder removes exactly the inserted space, so decoding still gives the text.
# (The apostrophe is left out: "'s" is a suffix, not an opening quote.)
WORD_OPENERS = ("\n", "\t", "(", "[", "{", '"', "\u201c", "\u2018", "\u00ab")


def word_opener_normalizer():
    return normalizers.Sequence([normalizers.Replace(opener, opener + " ") for opener in WORD_OPENERS])


def word_opener_decoder():
    return decoders.Sequence([decoders.ByteLevel(),
                              *(decoders.Replace(opener + " ", opener) for opener in WORD_OPENERS)])


def train_tokenizer(corpus, vocab_size: int):
    """A PreTrainedTokenizerFast. transformers is imported here, not at the top: every runner start-up
    (--dry_run, --list, a bad-input error) imports this module and need not pay for it."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = word_opener_normalizer()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = word_opener_decoder()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS,
                                      pad_token=PAD, additional_special_tokens=[EOT, *ROLE_TOKENS])
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def model_config(preset_name: str, tokenizer=None):
    """The preset's LlamaConfig; with its tokenizer, that tokenizer's size and special tokens (without, the
    preset's nominal vocabulary: enough for a memory estimate before the model is built)."""
    from transformers import LlamaConfig

    preset = PRESETS[ALIASES.get(preset_name, preset_name)]
    tokens = {} if tokenizer is None else {
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.convert_tokens_to_ids(EOT),
        "pad_token_id": tokenizer.pad_token_id}
    return LlamaConfig(
        vocab_size=preset.vocab_size if tokenizer is None else len(tokenizer),
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_heads,
        max_position_embeddings=preset.max_length,
        tie_word_embeddings=True,
        **tokens,
    )


def build_tiny_model(preset_name: str, output_dir, seed: int = 0) -> Path:
    """Train the tokenizer, initialise the weights from `seed`, save both to `output_dir`."""
    from transformers import LlamaForCausalLM

    preset = PRESETS[ALIASES.get(preset_name, preset_name)]
    tokenizer = train_tokenizer(vocabulary_corpus(), preset.vocab_size)
    config = model_config(preset_name, tokenizer)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    # Generation stops at the end of the assistant turn.
    model.generation_config.eos_token_id = [config.eos_token_id, tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.model_max_length = preset.max_length
    tokenizer.save_pretrained(output_dir)
    return output_dir


def build_record(preset_name: str, seed: int) -> dict:
    """What `embedded.json` in a built folder says, to tell our builds from a user's folder."""
    preset = ALIASES.get(preset_name, preset_name)
    return {"embedded_preset": preset, "seed": seed, "build_version": BUILD_VERSION,
            **asdict(PRESETS[preset])}
