"""Plain PyTorch hooks on the residual stream of every family in `models.families`, and attention knockout.

Residual states are numbered as in `hidden_states`: state 0 is what enters decoder layer 1 (the
embeddings, scaled where the family scales them), state i (1..L) is decoder layer i's output,
before the final norm. Decoder layers are numbered from 1, so decoder layer K reads state K - 1 and
writes state K. State 0 is reached with a pre-hook on the first layer, state i >= 1 with a forward
hook on layer i, both registered with `prepend=True` (so that they run before transformers' own output
capture, and a later hook on a state runs before an earlier one). Hooks accept a layer's input or output as a tensor (transformers 5) or a tuple (older
versions), and never take `output[0]` of a tensor, which would be batch row 0.

Positions are cells of a left-padded `Batch`: a prompt's token index plus the row's padding. Edits
apply to a pass over the whole prompt (a sequence as long as the batch), so during `generate` they
touch the prompt pass and leave the one-token decoding steps alone; with `every_token=True` they also
edit each later pass's last token (each generated token, as it is fed back) with the values of its
row's cell (give one cell per row then), which is steering "on every generated token".

- `read_states`: a dict {state: [batch, seq, hidden]} filled during a forward pass. Entered before an
  edit, it reads the edited state (the edit's hook, registered later with `prepend`, runs first).
- `edit_states`: write combine(old, value) at cells; the three below are its cases.
- `patch_states`: write given vectors into states at cells (activation patching, back-patching).
- `add_to_states`: add vectors at cells (steering).
- `scale_projection`: multiply the component of states at cells along given unit vectors by a factor
  (0: ablate it; 2: amplify it), leaving the orthogonal part as it is.
- `edit_last_token`: any of these edits at the last token of every row, for batches built elsewhere
  (lm-eval's): on each pass longer than one token (a prompt pass) and, with `every_token`, on the
  one-token decoding steps too.
- `knockout`: stop given query cells from attending to given key cells inside one decoder layer,
  by editing that layer's 4D attention mask (eager attention; load with attn_implementation="eager").
- `parity_check`: hooks that do nothing must give the unhooked model's logits; refused otherwise.
"""
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from models.families import decoder_body, decoder_layers, family_of, final_norm, unembed
from runner.errors import UserError


def locate(tokenizer, prompt: str, question: str, e1: str) -> tuple:
    """(token ids, positions) of a rendered two-hop prompt, found by character span.

    positions: `e1` (every token of e1's mention in the question), `t1` (its last token), `r` (the
    question's other tokens: the relation words and the words around them) and `t2` (the last prompt
    token). A token that straddles the end of e1's mention counts as e1's."""
    question_start = prompt.rfind(question)
    if question_start < 0:
        raise UserError(f"the question {question[:80]!r} does not occur in its rendered prompt")
    e1_start = prompt.find(e1, question_start, question_start + len(question))
    if not e1 or e1_start < 0:
        raise UserError(f"e1 {e1!r} does not occur in the question {question[:80]!r}")
    encoded = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]

    def within(start: int, end: int) -> list:
        return [i for i, (s, e) in enumerate(offsets) if s < end and e > start]

    e1_tokens = within(e1_start, e1_start + len(e1))
    t2 = len(ids) - 1
    relation = [i for i in within(question_start, question_start + len(question)) if i not in e1_tokens and i != t2]
    return ids, {"e1": e1_tokens, "t1": e1_tokens[-1], "r": relation, "t2": t2}


@dataclass
class Batch:
    """Prompts left-padded to one width, with the position ids `generate` would give them."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    padding: list  # left padding of each row

    @classmethod
    def left_padded(cls, sequences: list, pad_id: int, device="cpu") -> "Batch":
        width = max(len(ids) for ids in sequences)
        input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(sequences):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return cls(input_ids.to(device), attention_mask.to(device), position_ids.to(device),
                   [width - len(ids) for ids in sequences])

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]

    def inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}

    def cells(self, positions: list) -> tuple:
        """(rows, columns) of the batch for per-row prompt positions (an int or a list of ints per row)."""
        rows, columns = [], []
        for row, where in enumerate(positions):
            where = [where] if isinstance(where, int) else list(where)
            rows += [row] * len(where)
            columns += [self.padding[row] + p for p in where]
        device = self.input_ids.device
        return torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(columns, dtype=torch.long, device=device)


def n_states(model) -> int:
    return len(decoder_layers(model)) + 1


def _replace_first(value, tensor):
    """`value` (a tensor, or a tuple whose first element is the hidden states) with its hidden states replaced."""
    return (tensor, *value[1:]) if isinstance(value, tuple) else tensor


@contextmanager
def on_states(model, edit, states=None):
    """While active, every forward pass calls `edit(state, hidden)` at each residual state in `states`
    (default: all); a tensor it returns replaces the state for the rest of the pass."""
    layers = decoder_layers(model)
    states = range(len(layers) + 1) if states is None else sorted(set(states))

    def before_first(_module, args, kwargs):
        if args:
            new = edit(0, args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        new = edit(0, kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    def after(state):
        def hook(_module, _args, output):
            new = edit(state, output[0] if isinstance(output, tuple) else output)
            return None if new is None else _replace_first(output, new)
        return hook

    handles = []
    try:
        for state in states:
            if not 0 <= state <= len(layers):
                raise UserError(f"state {state}: this model has states 0..{len(layers)} (0 = embeddings)")
            handles.append(layers[0].register_forward_pre_hook(before_first, with_kwargs=True, prepend=True) if state == 0 else
                           layers[state - 1].register_forward_hook(after(state), prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def read_states(model, states=None, detach: bool = True):
    """Yield {state: [batch, seq, hidden]}, filled by the next forward pass (the last pass wins)."""
    found = {}

    def keep(state, hidden):
        found[state] = hidden.detach() if detach else hidden

    with on_states(model, keep, states):
        yield found


def _edit_cells(edits: dict, batch: Batch, combine, every_token: bool = False):
    """An `on_states` edit writing combine(old, new) at the cells of {state: (rows, columns, values)} on
    the prompt pass, and with `every_token` at the last token of those rows on every later pass."""
    def edit(state, hidden):
        if state not in edits:
            return None
        rows, columns, values = edits[state]
        if hidden.shape[1] != batch.width:  # not the prompt pass: a decoding step
            if not every_token:
                return None
            columns = torch.full_like(columns, hidden.shape[1] - 1)
        hidden = hidden.clone()
        hidden[rows, columns] = combine(hidden[rows, columns], values.to(hidden.dtype))
        return hidden
    return edit


def replaced(old, new):
    return new


def added(old, new):
    return old + new


def projection_scaled(factor: float):
    """combine(old, unit): old with its component along the unit vector multiplied by `factor`."""
    def combine(old, unit):
        return old + (factor - 1.0) * (old * unit).sum(-1, keepdim=True) * unit
    return combine


def edit_states(model, edits: dict, batch: Batch, combine, every_token: bool = False):
    """Write combine(old, value) at cells of `batch`: `edits` = {state: (rows, columns, values [cells,
    hidden])}, on the pass over the whole prompt; `every_token`: also at every generated token of those
    rows (one cell per row)."""
    return on_states(model, _edit_cells(edits, batch, combine, every_token), edits)


def patch_states(model, edits: dict, batch: Batch):
    """Replace states at cells, on the prompt pass only (activation patching, back-patching)."""
    return edit_states(model, edits, batch, replaced)


def add_to_states(model, edits: dict, batch: Batch, every_token: bool = False):
    """Add `values` to states at cells, as `edit_states` writes them."""
    return edit_states(model, edits, batch, added, every_token)


def scale_projection(model, edits: dict, batch: Batch, factor: float, every_token: bool = False):
    """Multiply the component of states at cells along unit vectors by `factor` (0 ablates it):
    `edits` = {state: (rows, columns, unit vectors [cells, hidden])}; `every_token` as `edit_states`."""
    return edit_states(model, edits, batch, projection_scaled(factor), every_token)


def edit_last_token(model, vectors: dict, combine, every_token: bool = False):
    """combine(state, vector) at the last token of every row, for left-padded batches one does not build
    (lm-eval's generation): `vectors` = {state: [hidden]}; on every pass longer than one token (a prompt
    pass) and, with `every_token`, on the one-token decoding steps as well."""
    def edit(state, hidden):
        if state not in vectors or (hidden.shape[1] == 1 and not every_token):
            return None
        hidden = hidden.clone()
        hidden[:, -1] = combine(hidden[:, -1], vectors[state].to(hidden.device, hidden.dtype))
        return hidden
    return on_states(model, edit, vectors)


def attention_module(model, layer: int):
    """Decoder layer `layer`'s (1-based) self-attention module."""
    return getattr(decoder_layers(model)[layer - 1], family_of(model.config).attention)


@contextmanager
def knockout(model, layer: int, cells: tuple, batch: Batch):
    """Inside decoder layer `layer` (1-based), query cell (rows[k], queries[k]) cannot attend to key
    cell (rows[k], keys[k]); `cells` = (rows, queries, keys). Every head is cut; the other keys share
    the attention. Needs eager attention, whose layers receive the 4D mask to edit."""
    if model.config._attn_implementation != "eager":
        raise UserError(f"attention knockout needs eager attention, not {model.config._attn_implementation!r}: "
                        "load the model with attn_implementation='eager'")
    rows, queries, keys = cells

    def hook(_module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dim() != 4:
            raise UserError(f"attention knockout: layer {layer} got no 4D attention mask; load the model with "
                            "attn_implementation='eager'")
        if mask.shape[-2] != batch.width:  # a decoding step, not the prompt pass
            return None
        mask = mask.expand(len(batch.padding), -1, -1, -1).clone()
        mask[rows, :, queries, keys] = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
        return args, {**kwargs, "attention_mask": mask}

    handle = attention_module(model, layer).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def final_logits(model, batch: Batch, last_only: bool = True) -> torch.Tensor:
    """float32 logits at the last position ([batch, vocab]) or at every position ([batch, seq, vocab])."""
    hidden = decoder_body(model)(**batch.inputs()).last_hidden_state
    return unembed(model, hidden[:, -1] if last_only else hidden).float()


def mismatch(reference: torch.Tensor, hooked: torch.Tensor, tolerance: float):
    """The largest difference if it exceeds `tolerance` times the largest logit (and 1e-6), else None."""
    difference = (reference - hooked).abs().max().item()
    return difference if difference > tolerance * max(reference.abs().max().item(), 1e-6) else None


@torch.no_grad()
def parity_check(model, batch: Batch, knockout_layers=(), tolerance: float = None) -> dict:
    """Run before every intervention: hooks that do nothing must leave the logits as they are.

    Three passes over `batch` compare with the unhooked logits at every real token: (1) reading every
    state, whose last one through the final norm and unembedding must give the model's own logits (so
    states are numbered as the model computes them); (2) writing every state back at every cell and
    adding zero to it; (3) the same, plus a knockout of no cells in each of `knockout_layers`. Any
    difference above `tolerance` (relative to the largest logit; default 1e-5 in float32, 1e-2 in
    16-bit) stops the run with one line. Returns the largest differences seen."""
    if tolerance is None:
        tolerance = 1e-5 if next(model.parameters()).dtype == torch.float32 else 1e-2
    reference = final_logits(model, batch, last_only=False)
    real = batch.attention_mask.bool()
    with read_states(model) as states:
        final_logits(model, batch)
    last = n_states(model) - 1
    lens = unembed(model, final_norm(model)(states[last])).float()
    rows = torch.arange(len(batch.padding), device=real.device).repeat_interleave(batch.width)
    columns = torch.arange(batch.width, device=real.device).repeat(len(batch.padding))
    same = {s: (rows, columns, hidden[rows, columns]) for s, hidden in states.items()}
    zero = {s: (rows, columns, torch.zeros_like(values)) for s, (_, _, values) in same.items()}
    nothing = (rows[:0], columns[:0], columns[:0])
    with ExitStack() as stack:
        stack.enter_context(patch_states(model, same, batch))
        stack.enter_context(add_to_states(model, zero, batch))
        rewritten = final_logits(model, batch, last_only=False)
        for layer in knockout_layers:
            stack.enter_context(knockout(model, layer, nothing, batch))
        knocked = final_logits(model, batch, last_only=False)
    checks = {"read (final norm + unembedding of the last state)": lens, "patch and add": rewritten,
              "knockout of nothing": knocked}
    report = {}
    for name, hooked in checks.items():
        difference = mismatch(reference[real], hooked[real], tolerance)
        if difference is not None:
            raise UserError(f"parity check failed on {model.config.model_type}: {name} changed the logits by "
                            f"{difference:.3g} (tolerance {tolerance:g} of the largest logit); the hooks do not fit "
                            "this model, so no intervention is run")
        report[name] = (reference[real] - hooked[real]).abs().max().item()
    return report
