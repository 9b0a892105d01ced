"""attention: non-causal multi-head attention with padding at the end of each sequence.

Until the fused kernel lands (issue 6) this runs the pure-PyTorch reference behind the final signature, so
the encoder modules already call the op they will keep.
"""
import math

import torch

from electra_ext.ops.reference import attention_reference


def attention(q, k, v, *, seqlens=None, dropout_p=0.0, softmax_scale=None, generator=None):
    """q, k, v: [B, T, H, D] (strided views of a fused QKV projection are fine), one dtype and device.
    seqlens: [B] int32/int64, the valid tokens of each sequence; the rest is padding at the end, ignored as
    keys, and its query rows come back as zeros. None: no padding. dropout_p: dropout on the attention
    probabilities, drawn from `generator` (torch's default generator when None). softmax_scale: default
    1/sqrt(D). Returns [B, T, H, D] in q's dtype."""
    if q.dim() != 4:
        raise ValueError(f"attention: q must be [batch, seq, heads, head_dim], got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attention: k and v must have q's shape {tuple(q.shape)}, "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise TypeError(f"attention: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if seqlens is not None:
        if seqlens.shape != q.shape[:1] or seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"attention: seqlens must be an int32/int64 tensor of shape [{q.shape[0]}], "
                             f"got {seqlens.dtype} {tuple(seqlens.shape)}")
        if seqlens.device != q.device:
            raise ValueError(f"attention: seqlens must be on q's device {q.device}, got {seqlens.device}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p!r}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    elif not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"attention: softmax_scale must be a positive number, got {softmax_scale!r}")
    return attention_reference(q, k, v, seqlens, dropout_p, softmax_scale, generator)
