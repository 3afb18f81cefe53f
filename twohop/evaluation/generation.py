"""The evaluator core: batched generation and candidate-set scoring (grading is in `grading`).

Generation is batched greedy decoding with left padding and stops at the end of the assistant
turn; candidate scoring ranks every candidate answer by its log-likelihood as the reply. Under
several processes (`accelerate launch`), `sharded` gives each rank its own share of the prompts.
"""
import torch
import torch.nn.functional as F

from models.families import decoder_body, unembed


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
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    replies = [None] * len(prompts)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in chunk]}, return_tensors="pt").to(device)
        texts = tokenizer.batch_decode(greedy(model, tokenizer, batch["input_ids"], batch["attention_mask"],
                                              max_new_tokens), skip_special_tokens=True)
        for i, text in zip(chunk, texts):
            replies[i] = text.strip()
    return replies


def greedy(model, tokenizer, input_ids, attention_mask, max_new_tokens: int) -> torch.Tensor:
    """The new tokens of greedy replies to left-padded prompts, stopping at the end of the turn."""
    limit = getattr(model.config, "max_position_embeddings", None)
    new_tokens = max_new_tokens if limit is None else min(max_new_tokens, limit - input_ids.shape[1])
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max(new_tokens, 1),
                            do_sample=False, eos_token_id=stop_token_ids(model, tokenizer),
                            pad_token_id=tokenizer.pad_token_id)
    return output[:, input_ids.shape[1]:]


def reply_ids(tokenizer, candidates) -> list:
    """Each candidate as a reply: its tokens plus the end-of-turn marker, as the chat template renders them."""
    head = prompt_text(tokenizer, [{"role": "user", "content": "x"}])
    out = []
    for candidate in candidates:
        full = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": candidate}],
                                             tokenize=False)
        out.append(tokenizer(full[len(head):], add_special_tokens=False)["input_ids"])
    return out


@torch.no_grad()
def score_candidates(model, tokenizer, prompts, candidates, pack_tokens: int = 512, batch_size: int = 16) -> torch.Tensor:
    """[len(prompts), len(candidates)] log-likelihood of each candidate as the full reply.

    The reply is the candidate plus the end-of-turn marker, so multi-token answers are compared on
    equal terms with single-token ones. Each prompt runs once, followed by a pack of candidate
    replies (up to `pack_tokens` tokens in all): a block mask lets each reply attend to the prompt
    and to itself only, and its positions continue the prompt's, so its score is the one prompt +
    reply alone gets (tested) for about one prompt's compute instead of one per candidate.
    """
    replies = reply_ids(tokenizer, candidates)
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    packs = []  # (prompt index, candidate indices)
    for p, ids in enumerate(prompt_ids):
        group, used = [], len(ids)
        for c, reply in enumerate(replies):
            if group and used + len(reply) > pack_tokens:
                packs.append((p, group))
                group, used = [], len(ids)
            group.append(c)
            used += len(reply)
        packs.append((p, group))
    length = lambda pack: len(prompt_ids[pack[0]]) + sum(len(replies[c]) for c in pack[1])  # noqa: E731
    packs.sort(key=length)
    scores = torch.zeros(len(prompts), len(candidates))
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    for start in range(0, len(packs), batch_size):
        chunk = packs[start:start + batch_size]
        width = max(map(length, chunk))
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        positions = torch.zeros_like(ids)
        allowed = torch.zeros((len(chunk), width, width), dtype=torch.bool)
        rows, sources, targets, cells = [], [], [], []  # one entry per scored reply token
        for row, (p, group) in enumerate(chunk):
            n = len(prompt_ids[p])
            ids[row, :n], positions[row, :n] = torch.tensor(prompt_ids[p]), torch.arange(n)
            allowed[row, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
            offset = n
            for c in group:
                k = len(replies[c])
                span = slice(offset, offset + k)
                ids[row, span], positions[row, span] = torch.tensor(replies[c]), torch.arange(n, n + k)
                allowed[row, span, :n] = True
                allowed[row, span, span] = torch.ones(k, k, dtype=torch.bool).tril()
                # token j of the reply is predicted at the prompt's last position (j = 0) or at token j - 1
                rows += [row] * k
                sources += [n - 1] + list(range(offset, offset + k - 1))
                targets += replies[c]
                cells += [p * len(candidates) + c] * k
                offset += k
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
        hidden = decoder_body(model)(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     position_ids=positions.to(device)).last_hidden_state
        logprobs = F.log_softmax(unembed(model, hidden[rows, sources]).float(), -1)
        token_scores = logprobs[torch.arange(len(targets)), torch.tensor(targets, device=device)].cpu()
        scores.view(-1).index_add_(0, torch.tensor(cells), token_scores)
    return scores
