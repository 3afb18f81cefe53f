"""The evaluator core: answer matching, batched generation and candidate-set scoring.

Matching normalises case, accents, punctuation and whitespace and then matches whole words (or
an alias), so "Oslo" is found in "It was Oslo." but "Nice" is not found in "Venice".
Generation is batched greedy decoding with left padding and stops at the end of the assistant
turn; candidate scoring ranks every candidate answer by its log-likelihood as the reply.
"""
import re
import unicodedata

import torch
import torch.nn.functional as F

ANSWER_MARKER = re.compile(r"answer is", re.IGNORECASE)


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def mentions(text: str, answer: str, aliases=()) -> bool:
    """Whole-word match of the answer or any alias in the text, after normalisation."""
    haystack = f" {normalize(text)} "
    return any(f" {normalize(a)} " in haystack for a in (answer, *aliases) if normalize(a))


def mention_position(text: str, answer: str):
    """Character position (in the normalised text) of the first whole-word mention, or None."""
    haystack = f" {normalize(text)} "
    index = haystack.find(f" {normalize(answer)} ")
    return None if index < 0 else index


def split_cot(generation: str) -> tuple:
    """(the chain, the final answer) of a chain-of-thought reply; the final part follows 'answer is'."""
    matches = list(ANSWER_MARKER.finditer(generation))
    if not matches:
        return generation, generation
    return generation[:matches[-1].start()], generation[matches[-1].end():]


def chain_answer(chain: str, candidates) -> str:
    """The candidate the chain states last (e.g. the city in '... Y was born in Z.'), or ''."""
    found = [(mention_position(chain, c), c) for c in candidates]
    found = [(p, c) for p, c in found if p is not None]
    return max(found)[1] if found else ""


def grade(row: dict, generation: str, style: str, candidates=(), aliases=()) -> dict:
    """Per-example grades: correct, strict (no bridge written), first_hop, valid_cot."""
    answer, bridge = row["answer"], row.get("answer_intermediate", "")
    if style == "cot":
        chain, final = split_cot(generation)
        stated = chain_answer(chain, candidates) if candidates else ""
        correct = mentions(final, answer, aliases)
        answer_at, bridge_at = mention_position(generation, answer), mention_position(generation, bridge) if bridge else None
        return {"correct": correct, "chain_correct": stated == answer,
                "first_hop": bool(bridge) and mentions(generation, bridge),
                "valid_cot": bridge_at is not None and answer_at is not None and bridge_at < answer_at}
    correct = mentions(generation, answer, aliases)
    first_hop = bool(bridge) and mentions(generation, bridge)
    return {"correct": correct, "strict": correct and not first_hop, "first_hop": first_hop}


def prompt_text(tokenizer, messages) -> str:
    """The rendered prompt for a row: every message but the gold reply, plus the generation prompt."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def stop_token_ids(model, tokenizer) -> list:
    ids = model.generation_config.eos_token_id
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids] if ids is not None else []
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id not in ids else [])


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens: int = 64, batch_size: int = 64) -> list:
    """Greedy replies for rendered prompts, batched by length with left padding (order preserved)."""
    tokenizer.padding_side = "left"
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    limit = getattr(model.config, "max_position_embeddings", None)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    replies = [None] * len(prompts)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in chunk]}, return_tensors="pt").to(device)
        new_tokens = max_new_tokens if limit is None else min(max_new_tokens, limit - batch["input_ids"].shape[1])
        output = model.generate(**batch, max_new_tokens=max(new_tokens, 1), do_sample=False,
                                eos_token_id=stop_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, text in zip(chunk, texts):
            replies[i] = text.strip()
    return replies


@torch.no_grad()
def score_candidates(model, tokenizer, prompts, candidates, batch_size: int = 256) -> torch.Tensor:
    """[len(prompts), len(candidates)] log-likelihood of each candidate as the full reply.

    The reply is the candidate plus the end-of-turn marker (as the chat template renders it), so
    multi-token answers are compared on equal terms with single-token ones.
    """
    reply_ids = []
    for candidate in candidates:
        full = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": candidate}],
                                             tokenize=False)
        head = prompt_text(tokenizer, [{"role": "user", "content": "x"}])
        reply_ids.append(tokenizer(full[len(head):], add_special_tokens=False)["input_ids"])
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    pairs = [(p, c) for p in range(len(prompts)) for c in range(len(candidates))]
    pairs.sort(key=lambda pc: len(prompt_ids[pc[0]]) + len(reply_ids[pc[1]]))
    scores = torch.empty(len(prompts), len(candidates))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        sequences = [prompt_ids[p] + reply_ids[c] for p, c in chunk]
        width = max(map(len, sequences))
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for row, sequence in enumerate(sequences):
            ids[row, :len(sequence)] = torch.tensor(sequence)
            attention[row, :len(sequence)] = 1
        logprobs = F.log_softmax(model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits.float(), -1)
        for row, (p, c) in enumerate(chunk):
            start_at = len(prompt_ids[p])
            targets = torch.tensor(reply_ids[c], device=device)
            positions = torch.arange(start_at - 1, start_at - 1 + len(targets), device=device)
            scores[p, c] = logprobs[row, positions, targets].sum().item()
    return scores
