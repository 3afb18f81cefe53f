"""The evaluator core: batched generation and candidate-set scoring (grading is in `grading`).

Generation is batched greedy decoding with left padding and stops at the end of the assistant
turn; candidate scoring ranks every candidate answer by its log-likelihood as the reply. Under
several processes (`accelerate launch`), `sharded` gives each rank its own share of the prompts.
"""
import torch
import torch.nn.functional as F


def sharded(function, items: list) -> list:
    """`function(items) -> list` (one result per item), with each rank of a multi-process launch
    computing an interleaved share; every rank gets the full list back, in order."""
    from accelerate import PartialState
    from accelerate.utils import gather_object
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes == 1:
        return function(items)
    world, rank = state.num_processes, state.process_index
    parts = gather_object([function(items[rank::world])])
    out = [None] * len(items)
    for part_rank, part in enumerate(parts):
        out[part_rank::world] = part
    return out


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
