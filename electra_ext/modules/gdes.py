"""Gradient-disentangled embedding sharing (GDES, He et al. 2021, DeBERTa-v3) between generator and
discriminator."""
import torch
import torch.nn.functional as F
from torch import nn


class GradientDisentangledEmbedding(nn.Module):
    """DeBERTa-v3's gradient-disentangled embedding sharing (GDES): the table is another model's table,
    detached, plus a trainable residual of this model's, initialised to zero. The other model's training
    moves the shared table; this model's loss only moves its residual."""

    def __init__(self, shared: nn.Embedding):
        super().__init__()
        # Not a submodule: the shared table belongs to (and is saved, moved and trained with) the other model.
        object.__setattr__(self, "shared", shared)
        self.residual = nn.Parameter(torch.zeros_like(shared.weight))

    @property
    def weight(self) -> torch.Tensor:
        """The table this model sees (without gradient to the shared part)."""
        return self.shared.weight.detach() + self.residual

    def forward(self, ids):
        return F.embedding(ids, self.shared.weight).detach() + F.embedding(ids, self.residual)
