"""Losses over reply tokens: the training loss, per-row evaluation losses, the auxiliary loss."""
import torch
import torch.nn.functional as F

from models.families import decoder_body, decoder_layers, final_norm, input_embeddings, unembed, unembedding
from twohop.training.batching import IGNORE, collate


def reply_logits(model, input_ids, attention_mask, labels, output_hidden_states=False) -> tuple:
    """(logits at the positions that predict a reply token, those tokens, the [batch, length - 1]
    mask of such positions, hidden states if asked).

    The stock forward projects every position onto the vocabulary, and prompts are most of each
    row: this makes a tiny-model training step 1.4x faster and spares an 8B model a
    [batch, length, 128k] logits tensor.
    """
    outputs = decoder_body(model)(input_ids=input_ids, attention_mask=attention_mask,
                                  output_hidden_states=output_hidden_states, use_cache=False)
    targets = labels[:, 1:]
    supervised = targets != IGNORE
    logits = unembed(model, outputs.last_hidden_state[:, :-1][supervised]).float()
    return logits, targets[supervised], supervised, outputs.hidden_states


@torch.no_grad()
def row_losses(model, examples, pad_id, device, batch_size=64) -> tuple:
    """(per-row mean loss over reply tokens, per-row argmax-correct reply), in input order."""
    was_training = model.training
    model.eval()
    losses, correct = [0.0] * len(examples), [False] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in chunk], pad_id).items()}
        logits, targets, supervised, _ = reply_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        rows = supervised.nonzero()[:, 0]  # the batch row of each reply token
        token_loss = F.cross_entropy(logits, targets, reduction="none")
        sums = torch.zeros(len(chunk), device=logits.device).index_add_(0, rows, token_loss)
        misses = torch.zeros(len(chunk), device=logits.device).index_add_(0, rows, (logits.argmax(-1) != targets).float())
        for i, total, count, miss in zip(chunk, sums.tolist(), supervised.sum(1).tolist(), misses.tolist()):
            losses[i], correct[i] = total / count, miss == 0
    model.train(was_training)
    return losses, correct


def evaluate_losses(model, examples, pad_id, device) -> tuple:
    """({mean loss over reply tokens, share of rows whose reply is argmax-correct, n}, per-row losses)."""
    losses, correct = row_losses(model, examples, pad_id, device)
    return {"loss": sum(losses) / len(losses), "accuracy": sum(correct) / len(correct), "n": len(losses)}, losses


def question_gaps(true_questions, true_losses, shuffled_questions, shuffled_losses) -> list:
    """Per true row: the mean loss of its question's shuffled answers minus its own loss."""
    by_question = {}
    for question, loss in zip(shuffled_questions, shuffled_losses):
        by_question.setdefault(question, []).append(loss)
    return [sum(by_question[q]) / len(by_question[q]) - loss for q, loss in zip(true_questions, true_losses)
            if q in by_question]


def auxiliary_loss(model, hidden_states, batch, config) -> torch.Tensor:
    positions, targets = batch["aux_position"], batch["aux_target"]
    rows = (positions >= 0).nonzero(as_tuple=True)[0]
    if len(rows) == 0:
        return hidden_states[0].sum() * 0.0
    layer = config["aux_loss_target_layer"]
    layer = len(decoder_layers(model)) // 2 if layer < 0 else layer
    states = hidden_states[layer + 1][rows, positions[rows]]  # hidden_states[0] is the embeddings
    if config["aux_loss_type"] == "logit":  # logit lens through the frozen final norm and unembedding
        logits = unembedding(model)(final_norm(model)(states)).float()
        return F.cross_entropy(logits, targets[rows])
    embedding = input_embeddings(model).weight[targets[rows]].detach()
    return (1 - F.cosine_similarity(states.float(), embedding.float(), dim=-1)).mean()


class ReplyLoss(torch.nn.Module):
    """The mean loss over reply tokens. It wraps the model (rather than calling its parts from the
    training loop) so DDP/FSDP hooks see one forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels, output_hidden_states=False):
        logits, targets, _, hidden_states = reply_logits(self.model, input_ids, attention_mask, labels,
                                                         output_hidden_states)
        return F.cross_entropy(logits, targets), hidden_states
