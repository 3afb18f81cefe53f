"""From chat records to training batches.

Each record's messages go through the model's own chat template: the prompt (every turn but the
last, with the generation prompt) is context, the assistant reply and its end-of-turn token are
the target. Prompt and reply are tokenized separately and concatenated, so the loss mask is exact
for any template and matches what the model sees at generation time. A base model without a chat
template (GPT-2) trains on raw text instead: rows that carry `prompt` and `completion` (the IOI
rows do) give the context and the target.
"""
import random

import torch

from runner.errors import UserError
from twohop.evaluation.grading import split_aliases

IGNORE = -100


def split_chat(tokenizer, messages) -> tuple:
    """(prompt text, reply text including the end-of-turn marker) under the model's template."""
    if messages[-1]["role"] != "assistant":
        raise UserError("the last message of a training row must be the assistant's reply")
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise UserError("the chat template renders the prompt differently inside the full conversation; "
                        "loss masking needs the prompt to be a prefix")
    reply = full[len(prompt):]
    # Some templates append a trailing newline or BOS after the last turn; keep it, it's harmless.
    return prompt, reply


def encode_chat(tokenizer, messages, max_length: int) -> dict:
    prompt, reply = split_chat(tokenizer, messages)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
    ids = prompt_ids + reply_ids
    if len(ids) > max_length:
        raise UserError(f"a training row has {len(ids)} tokens, more than max_length={max_length} "
                        f"(prompt starts {prompt[:60]!r}); raise max_length or shorten the data")
    return {"input_ids": ids, "labels": [IGNORE] * len(prompt_ids) + reply_ids, "prompt_length": len(prompt_ids)}


def encode_completion(tokenizer, row, max_length: int) -> dict:
    """Raw text: the tokenizer's BOS (if it has one) and `prompt` are context, `completion` alone is the
    target. No end-of-text is appended: a one-name completion is the whole loss, so there is no
    end-of-text token for the model to learn in its place (seed note 004's fine-tune collapsed to it)."""
    if not all(isinstance(row.get(key), str) and row.get(key) for key in ("prompt", "completion")):
        raise UserError("the model's tokenizer has no chat template, so it trains on raw text: rows need text "
                        f"fields 'prompt' and 'completion' (as the IOI rows have); this row has {sorted(row)}")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = bos + tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    target = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
    if len(prompt_ids) + len(target) > max_length:
        raise UserError(f"a training row has {len(prompt_ids) + len(target)} tokens, more than max_length={max_length} "
                        f"(prompt starts {row['prompt'][:60]!r}); raise max_length or shorten the data")
    return {"input_ids": prompt_ids + target, "labels": [IGNORE] * len(prompt_ids) + target,
            "prompt_length": len(prompt_ids)}


def text_format(tokenizer) -> str:
    """chat when the tokenizer has a chat template, else completion (raw text). Not a config key: the model
    decides, and a new key would change the fingerprint of every finished training run."""
    return "chat" if tokenizer.chat_template else "completion"


def pack(examples, max_length: int, rng: random.Random) -> list:
    """Concatenate shuffled examples into sequences of at most `max_length` tokens.

    Packed examples attend to each other (the usual cheap packing); for the tiny model this is a
    feature: it learns to recall facts in the middle of a sequence.
    """
    order = list(range(len(examples)))
    rng.shuffle(order)
    packed, current = [], {"input_ids": [], "labels": [], "sources": []}
    for i in order:
        example = examples[i]
        if current["input_ids"] and len(current["input_ids"]) + len(example["input_ids"]) > max_length:
            packed.append(current)
            current = {"input_ids": [], "labels": [], "sources": []}
        current["input_ids"] = current["input_ids"] + example["input_ids"]
        current["labels"] = current["labels"] + example["labels"]
        current["sources"].append(i)
    if current["input_ids"]:
        packed.append(current)
    return packed


def length_grouped_batches(lengths, batch_size: int, seed: int, epoch: int, group_batches: int = 50) -> list:
    """Batches of similar length (little padding) in a random order that depends on (seed, epoch).

    Shuffle, cut into groups of `group_batches` batches, sort each group by length, cut it into
    batches, shuffle the batches: the randomness of a shuffled loader with a fraction of its padding.
    """
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    group = batch_size * group_batches
    batches = []
    for start in range(0, len(order), group):
        chunk = sorted(order[start:start + group], key=lambda i: lengths[i])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def random_batches(n: int, batch_size: int, seed: int, epoch: int) -> list:
    """The common default: a shuffled loader, each batch padded to its longest row (the baseline)."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(n))
    rng.shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def collate(examples, pad_id: int) -> dict:
    """Right-pad a batch to its longest row; padding is masked in attention and loss."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        attention[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def pack_apart(rows, pad_id: int) -> dict:
    """Rows of (token ids, target mask), packed first-fit, longest first, into as few sequences as hold them
    at the longest row's width, each row attending to itself alone: its position ids restart at 0, which
    transformers reads as a sequence boundary when the model gets no attention mask and no cache
    (`use_cache=False`). So the loss is that of one row a sequence, with a fraction of the padding (a
    two-hop drill batch of 32 rows of 0-10 distractors fits in about 24 sequences). Returns input_ids,
    labels (IGNORE at padding and at each row's first token, which nothing before it predicts),
    position_ids and the target mask."""
    width = max(len(ids) for ids, _ in rows)
    bins = []  # [free width, row indices]
    for i in sorted(range(len(rows)), key=lambda i: -len(rows[i][0])):
        fits = next((b for b in bins if b[0] >= len(rows[i][0])), None)
        if fits is None:
            fits = [width, []]
            bins.append(fits)
        fits[0] -= len(rows[i][0])
        fits[1].append(i)
    batch = {"input_ids": torch.full((len(bins), width), pad_id), "labels": torch.full((len(bins), width), IGNORE),
             "position_ids": torch.zeros((len(bins), width), dtype=torch.long),
             "targets": torch.zeros((len(bins), width), dtype=torch.bool)}
    for sequence, (_, members) in enumerate(bins):
        start = 0
        for ids, mask in (rows[i] for i in members):
            end = start + len(ids)
            batch["input_ids"][sequence, start:end] = batch["labels"][sequence, start:end] = torch.tensor(ids)
            batch["labels"][sequence, start] = IGNORE
            batch["targets"][sequence, start:end] = torch.tensor(mask)
            batch["position_ids"][sequence, start:end] = torch.arange(len(ids))
            start = end
        batch["position_ids"][sequence, start:] = torch.arange(width - start)  # the padding: a sequence of its own
    return batch


def aux_annotations(tokenizer, example: dict, row: dict) -> dict:
    """Where the auxiliary loss applies: the last token of the question prefix, and the bridge's first token."""
    prefix = row.get("auxiliary_loss_prefix") or ""
    if not prefix:
        return {"aux_position": -1, "aux_target": -1}
    prompt = tokenizer.decode(example["input_ids"][:example["prompt_length"]])
    start = prompt.find(prefix)
    if start < 0:
        return {"aux_position": -1, "aux_target": -1}
    end = start + len(prefix)
    offsets = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    position = max(i for i, (s, e) in enumerate(offsets) if e <= end)
    bridge, _ = split_aliases(row["answer_intermediate"])
    target = tokenizer(bridge, add_special_tokens=False)["input_ids"][0]
    return {"aux_position": position, "aux_target": target}


def encode_rows(tokenizer, rows, config, with_aux=False) -> list:
    chat = text_format(tokenizer) == "chat"
    examples = []
    for row in rows:
        example = encode_chat(tokenizer, row["messages"], config["max_length"]) if chat \
            else encode_completion(tokenizer, row, config["max_length"])
        if with_aux:
            example.update(aux_annotations(tokenizer, example, row))
        examples.append(example)
    return examples
