"""Scores of a sequence-classification model (a reward model or critic) at chosen positions.

A reward model is a Hugging Face `*ForSequenceClassification`: the causal LM's backbone and a
linear `score` head (hidden -> A attributes, A = 1 for a scalar reward). Hugging Face's own
forward pools the head's output at each row's last non-pad token, which is wrong for packed
rows holding several sequences. `sequence_scores` instead runs the model's forward as usual
(so DDP, FSDP2 and PEFT see a normal call) and reads the head's full output through a forward
hook, at the last token of every packed sequence. The head is tiny (d x A), so scoring every
position costs nothing next to the backbone.

What a saved reward model carries in its `config.json` (read by `RewardModelInfo.from_config`):
    id2label             the attribute names, in head order
    reward_weights       weights w of the scalar reward r = w . a (default: [1] for one attribute)
    reward_mean, reward_std   statistics of r over the training responses, so that servers and
                         RL recipes can standardise it: (r - mean) / std
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from alignkit.data.batching import collate_rows
from alignkit.data.reward import scored_example
from alignkit.data.tokenize import IGNORE
from alignkit.models.loading import unwrap

__all__ = ["RewardModelInfo", "init_head_to_mean", "score_head", "score_sequences", "sequence_scores"]


def score_head(model: nn.Module) -> nn.Module:
    """The `score` head of a (possibly PEFT-wrapped, DDP-wrapped) sequence classifier.

    Under PEFT the head is a `ModulesToSaveWrapper` named `...score` whose output is the active
    copy's: the shortest matching name is the one the forward calls.
    """
    names = [name for name, _ in unwrap(model).named_modules() if name.split(".")[-1] == "score"]
    if not names:
        raise ValueError(f"{type(unwrap(model)).__name__} has no `score` head: not a sequence classifier")
    return unwrap(model).get_submodule(min(names, key=len))


def sequence_scores(
    model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, ends: torch.Tensor
) -> torch.Tensor:
    """The head's output at the last token of each sequence.

    Args:
        input_ids: (B, T) token ids; a row may hold several packed sequences.
        position_ids: (B, T) restarting at 0 at each packed sequence (block-diagonal attention).
        ends: (B, T) bool, True at the last token of every sequence.

    Returns:
        (S, A) scores, S = ends.sum(), sequences in row-major order of `ends`.
    """
    captured: list[torch.Tensor] = []
    handle = score_head(model).register_forward_hook(lambda _m, _args, output: captured.append(output))
    try:
        model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    finally:
        handle.remove()
    scores = captured[-1]  # (B, T, A)
    return scores.reshape(-1, scores.shape[-1])[ends.reshape(-1)]


@torch.no_grad()
def init_head_to_mean(
    model: nn.Module, sequences: list[list[int]], pad_id: int, target_mean: torch.Tensor, batch_size: int = 16
) -> float:
    """Set the head so that it predicts `target_mean` (A,) on typical inputs: W = mu u^T / |u|^2,
    with u the mean last-token hidden state over `sequences` (the head has no bias).

    Why: a regression head that starts at zero faces a loss dominated by the labels' mean (0-4
    attributes: MSE ~7 against a variance ~1). Adam then moves the whole backbone toward one
    output for every input, and the features that tell responses apart collapse (observed: all
    Pearson r ~0 on the task world). Starting at the mean leaves only the variation to learn.
    Returns the relative spread of the initial predictions, std / |mean|, for the log.
    """
    head = score_head(model)
    # Let the head pass its input through: score_sequences then yields the last-token hidden states.
    handle = head.register_forward_hook(lambda _m, args, _out: args[0])
    try:
        h = score_sequences(model, sequences, pad_id, batch_size, next(model.parameters()).device)  # (N, d)
    finally:
        handle.remove()
    u = h.mean(0)  # (d,)
    weight = torch.outer(target_mean.float(), u) / u.dot(u)  # (A, d)
    for name, param in head.named_parameters():
        if name.endswith("weight"):
            param.copy_(weight.to(param.dtype))
    predictions = h @ weight.T  # (N, A)
    return float((predictions.std(0) / predictions.mean(0).abs().clamp_min(1e-6)).mean())


@dataclass
class RewardModelInfo:
    """Attribute names, scalar-reward weights and normalisation statistics of a reward model."""

    attributes: list[str]
    weights: list[float]
    mean: float = 0.0
    std: float = 1.0

    def config_updates(self) -> dict:
        return {
            "id2label": dict(enumerate(self.attributes)),
            "label2id": {name: i for i, name in enumerate(self.attributes)},
            "num_labels": len(self.attributes),
            "problem_type": "regression",
            "reward_weights": self.weights,
            "reward_mean": self.mean,
            "reward_std": self.std,
        }

    @classmethod
    def from_config(cls, config) -> RewardModelInfo:
        n = config.num_labels
        id2label = getattr(config, "id2label", None) or {}
        attributes = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)]
        weights = getattr(config, "reward_weights", None) or [1.0 / n] * n
        return cls(
            attributes,
            [float(w) for w in weights],
            float(getattr(config, "reward_mean", 0.0) or 0.0),
            float(getattr(config, "reward_std", 1.0) or 1.0),
        )

    def reward(self, scores: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(N, A) attribute scores -> (N,) scalar rewards w . a, standardised if asked."""
        r = scores.float() @ torch.tensor(self.weights, dtype=torch.float32, device=scores.device)
        return (r - self.mean) / self.std if normalize else r


@torch.no_grad()
def score_sequences(
    model: nn.Module,
    sequences: list[list[int]],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    autocast=None,
    min_batches: int = 0,
) -> torch.Tensor:
    """(N, A) float32 scores of N token sequences, one row each, in `batch_size` rows per forward.

    Sequences are batched by length (little padding) and the scores returned in input order.
    `min_batches`: run at least this many forwards, padding with one-token dummy rows, for a
    sharded (FSDP) model where every process must make the same number of calls.
    """
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    chunks += [[]] * max(0, min_batches - len(chunks))
    was_training = model.training
    model.eval()
    out: torch.Tensor | None = None
    for chunk in chunks:
        rows = [[scored_example(sequences[i], "")] for i in chunk] or [[scored_example([pad_id], "")]]
        batch = collate_rows(rows, pad_id)
        with autocast() if autocast else contextlib.nullcontext():
            scores = (
                sequence_scores(
                    model,
                    batch["input_ids"].to(device),
                    batch["position_ids"].to(device),
                    (batch["target_ids"] != IGNORE).to(device),
                )
                .float()
                .cpu()
            )
        if out is None:
            out = torch.zeros(len(sequences), scores.shape[-1])
        if chunk:
            out[chunk] = scores
    model.train(was_training)
    return out if out is not None else torch.zeros(0, 1)
