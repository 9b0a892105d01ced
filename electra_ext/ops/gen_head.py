"""gen_head: ELECTRA's tied-embedding generator head on the masked rows only.

    logits = h weightᵀ + bias                   [M, V], never kept whole by the kernel (issue 7)
    loss   = mean cross-entropy over rows whose target is not ignore_index; 0 when there are none
    sample = argmax(logits / temperature + Gumbel noise), without gradient

Until the fused kernel lands (issue 7) this runs the pure-PyTorch reference behind the final signature.
Rows with target == ignore_index let callers pass a fixed number of rows (e.g. max predictions per
sequence), which keeps shapes static under torch.compile.
"""
import math
from typing import NamedTuple

import torch

from electra_ext.ops.reference import gen_head_reference


class GenHeadOutput(NamedTuple):
    loss: torch.Tensor         # float32 scalar, with gradient to h, weight, bias
    samples: torch.Tensor      # [M] int64: Gumbel-max samples (any value on ignored rows)
    lse: torch.Tensor          # [M] float32: log-sum-exp of each row's logits
    num_correct: torch.Tensor  # int64 scalar: counted rows whose argmax is the target


def gen_head(h, weight, bias, targets, *, temperature=1.0, generator=None, disallow_correct=False,
             ignore_index=-100):
    """h: [M, E] float; weight: [V, E] (the tied word embeddings); bias: [V]; targets: [M] int64 token ids
    or ignore_index. generator: torch.Generator for the Gumbel noise (the default one when None).
    disallow_correct: the target can never be sampled. Returns a GenHeadOutput."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"gen_head: h must be [M, E] and weight [V, E] with the same E, "
                         f"got {tuple(h.shape)} and {tuple(weight.shape)}")
    if bias.shape != weight.shape[:1]:
        raise ValueError(f"gen_head: bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
    if targets.shape != h.shape[:1] or targets.dtype != torch.int64:
        raise ValueError(f"gen_head: targets must be int64 of shape [M={h.shape[0]}], "
                         f"got {targets.dtype} {tuple(targets.shape)}")
    if not (h.is_floating_point() and weight.is_floating_point() and bias.is_floating_point()):
        raise TypeError(f"gen_head: h, weight, bias must be floating point, got {h.dtype}, {weight.dtype}, "
                        f"{bias.dtype}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"gen_head: temperature must be a positive number, got {temperature!r}")
    if disallow_correct and weight.shape[0] < 2:
        raise ValueError("gen_head: disallow_correct needs a vocabulary of at least 2 tokens")
    return GenHeadOutput(*gen_head_reference(h, weight, bias, targets, temperature, generator, disallow_correct,
                                             ignore_index))
