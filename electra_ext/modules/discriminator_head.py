"""ELECTRA's replaced-token-detection head: dense(H->H) -> GELU -> dense(H->1), with its BCE loss.

Parameter names match HF transformers' `ElectraDiscriminatorPredictions` (`dense`, `dense_prediction`), so
the module loads `discriminator_predictions.*` from an `ElectraForPreTraining` state dict unchanged.
"""
import torch
from torch import nn

from electra_ext.ops import disc_head


class DiscriminatorHead(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        if hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive integer, got {hidden_size}")
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dense_prediction = nn.Linear(hidden_size, 1)

    def forward(self, hidden_states: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor):
        """hidden_states [..., H]; labels, valid: bool [...] (replaced, not padding).

        Returns (logits [...] float32, loss float32 scalar: mean BCE over valid tokens)."""
        if labels.shape != hidden_states.shape[:-1] or valid.shape != hidden_states.shape[:-1]:
            raise ValueError(
                f"labels and valid must have the shape of hidden_states without its last dimension, "
                f"{tuple(hidden_states.shape[:-1])}; got {tuple(labels.shape)} and {tuple(valid.shape)}"
            )
        pre_activation = self.dense(hidden_states).reshape(-1, hidden_states.shape[-1])
        logits, loss = disc_head(
            pre_activation, self.dense_prediction.weight.view(-1), self.dense_prediction.bias,
            labels.reshape(-1), valid.reshape(-1),
        )
        return logits.view(hidden_states.shape[:-1]), loss
