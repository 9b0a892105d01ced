"""attention: non-causal multi-head attention over sequences with padding, fused (FlashAttention-2 style).

Three layouts share one custom op, torch.ops.electra_ext.attention (schema and layout: csrc/electra_ext.cpp and
csrc/cuda/attention_launch.h):
- `attention(q, k, v, seqlens=...)`: a padded batch [B, T, H, D], valid tokens first in each sequence;
- `attention_qkvpacked(qkv, seqlens=...)`: the same with q, k, v packed in one [B, T, 3, H, D] tensor, a fused
  QKV projection's output, whose gradient the backward writes in place of three (no stack of dq, dk, dv);
- `attention_varlen(q, k, v, cu_seqlens, max_seqlen)`: sequences packed back to back in [tokens, H, D], so an
  encoder can drop its padding tokens altogether.
Both run the same kernels, which never hold a [T, T] matrix in memory: the forward saves each row's
log-sum-exp and the backward recomputes the probabilities from it.

Dropout on the attention probabilities is keyed by (seed, batch, head, row, column) with Philox
(csrc/common/philox.h), the seed drawn from `generator`; the backward regenerates the same mask, and the CPU,
emulated and CUDA kernels and the reference drop exactly the same entries for one seed. Each entry draws one
byte (16 per Philox call, as FlashAttention does): dropout_p is rounded to a multiple of 1/256 (0.1 drops
26/256 = 10.16% of the entries) and kept entries are scaled by the inverse of the exact keep probability.

Kernels: CPU float32, bfloat16 and float16, any head dim; CUDA float16 and bfloat16 with head dim 32, 64 or 128.
Other dtypes (float64) and head dims run the pure-PyTorch reference (electra_ext/ops/reference.py), which
materialises the [B, H, T, T] scores.
"""
import math

import torch

from electra_ext.ops import backend as backends
from electra_ext.ops.eager_autograd import register_autograd
from electra_ext.ops.reference import attention_reference, philox_seed

_OP = torch.ops.electra_ext.attention
_BACKWARD_OP = torch.ops.electra_ext.attention_backward.default

CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CUDA_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
CUDA_KERNEL_HEAD_DIMS = (32, 64, 128)

_SELECT = backends.Selector(_OP.default)


def _cuda_kernel_takes(q):
    return q.dtype in CUDA_KERNEL_DTYPES and q.shape[-1] in CUDA_KERNEL_HEAD_DIMS


def _implementation(q, backend):
    """"kernels", "emulated" or "reference" for these inputs (see electra_ext.ops.backend)."""
    device = q.device.type
    implementation = _SELECT(backend, q.device)
    if implementation == "emulated" and not _cuda_kernel_takes(q):
        raise ValueError(f"attention: backend='emulated' runs the CUDA kernels, which take float16/bfloat16 "
                         f"q, k, v with head_dim in {CUDA_KERNEL_HEAD_DIMS}; got {q.dtype}, head_dim "
                         f"{q.shape[-1]}")
    if implementation == "kernels":
        takes = q.dtype in CPU_KERNEL_DTYPES if device == "cpu" else _cuda_kernel_takes(q)
        if not takes:
            return "reference"
    return implementation


def _check_qkv(q, k, v, layout):
    if q.dim() != len(layout):
        raise ValueError(f"attention: q must be [{', '.join(layout)}], got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attention: k and v must have q's shape {tuple(q.shape)}, "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise TypeError(f"attention: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] == 0 or q.shape[-2] == 0:
        raise ValueError(f"attention: q must have heads > 0 and head_dim > 0, got shape {tuple(q.shape)}")


def dropout_p_is_drawable(dropout_p):
    """Whether the mask's one byte per entry (csrc/common/philox.h) can draw dropout_p: 0, or in [1/512, 511/512).
    p is rounded to a multiple of 1/256, so a smaller p would mean no dropout at all and a larger one every entry
    dropped."""
    return dropout_p == 0.0 or 1 / 512 <= dropout_p < 511 / 512


def _check_options(q, dropout_p, softmax_scale):
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p!r}")
    if not dropout_p_is_drawable(dropout_p):
        raise ValueError(f"attention: dropout_p must be 0 or in [1/512, 511/512) (the mask's resolution is "
                         f"1/256), got {dropout_p!r}")
    if softmax_scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"attention: softmax_scale must be a positive number, got {softmax_scale!r}")
    return float(softmax_scale)


def _check_lengths(name, lengths, limit):
    """Values in [0, limit], checked where that costs no device synchronisation (CPU tensors, eager)."""
    if lengths.device.type == "cpu" and backends.has_values(lengths) and lengths.numel():
        if int(lengths.min()) < 0 or int(lengths.max()) > limit:
            raise ValueError(f"attention: {name} must lie in [0, {limit}], got values from {int(lengths.min())} "
                             f"to {int(lengths.max())}")


def _dropout_seed(q, dropout_p, generator):
    """int64 [1] on q's device: the Philox key of this call's dropout mask (None without dropout)."""
    return None if dropout_p == 0.0 else philox_seed(q.device, generator)


def attention(q, k, v, *, seqlens=None, dropout_p=0.0, softmax_scale=None, generator=None, backend=None):
    """q, k, v: [B, T, H, D] (strided views of a fused QKV projection are fine), one dtype and device.
    seqlens: [B] int32/int64, the valid tokens of each sequence; the rest is padding at the end, ignored as
    keys, and its query rows come back as zeros. None: no padding. dropout_p: dropout on the attention
    probabilities, keyed by a seed drawn from `generator` (torch's default generator for q's device when
    None). softmax_scale: default 1/sqrt(D). backend: see electra_ext.ops.backend (None: the default).
    Returns [B, T, H, D] in q's dtype."""
    _check_qkv(q, k, v, ("batch", "seq", "heads", "head_dim"))
    return _padded_attention(q, k, v, seqlens, dropout_p, softmax_scale, generator, backend)


def attention_qkvpacked(qkv, *, seqlens=None, dropout_p=0.0, softmax_scale=None, generator=None, backend=None):
    """`attention` on q, k, v = qkv.unbind(2), qkv: [B, T, 3, H, D] (the output of a fused QKV projection viewed
    so; unit stride along D). The kernels read the three in place and their backward writes qkv's gradient as
    one [B, T, 3, H, D] tensor, where `attention` on the unbound views ends in a stack of three gradients (a
    copy of the whole projection's gradient per layer). Same options; returns [B, T, H, D]."""
    # qkv itself is checked, never unbound: at ELECTRA-Small on a GPU the host time of each call paces the layer.
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"attention_qkvpacked: qkv must be [batch, seq, 3, heads, head_dim], got shape "
                         f"{tuple(qkv.shape)}")
    if not qkv.is_floating_point():
        raise TypeError(f"attention_qkvpacked: qkv must be a floating tensor, got {qkv.dtype}")
    if qkv.shape[-1] == 0 or qkv.shape[-2] == 0:
        raise ValueError(f"attention_qkvpacked: qkv must have heads > 0 and head_dim > 0, got shape "
                         f"{tuple(qkv.shape)}")
    return _padded_attention(qkv, None, None, seqlens, dropout_p, softmax_scale, generator, backend)


def _padded_attention(q, k, v, seqlens, dropout_p, softmax_scale, generator, backend):
    """attention on checked [B, T, H, D] q, k, v, or with k and v None on q = qkv [B, T, 3, H, D]; the op then
    takes the packed tensor, so that its gradient comes back packed."""
    if seqlens is not None:
        if seqlens.shape != q.shape[:1] or seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"attention: seqlens must be an int32/int64 tensor of shape [{q.shape[0]}], "
                             f"got {seqlens.dtype} {tuple(seqlens.shape)}")
        if seqlens.device != q.device:
            raise ValueError(f"attention: seqlens must be on q's device {q.device}, got {seqlens.device}")
        _check_lengths("seqlens", seqlens, q.shape[1])
    softmax_scale = _check_options(q, dropout_p, softmax_scale)
    implementation = _implementation(q, backend)
    seed = _dropout_seed(q, dropout_p, generator)
    if implementation == "reference":
        return attention_reference(*(q.unbind(2) if k is None else (q, k, v)), seqlens, dropout_p, softmax_scale,
                                   seed)
    # seqlens None stays None: the op's padded layout then takes every sequence as whole, no lengths tensor made.
    lengths = None if seqlens is None else seqlens.to(torch.int32)
    # starts None: the op's padded layout (sequence b at token b * T), whose kernels also write the padding rows,
    # so that no output needs a zero fill first. The op takes [B, T, ...] as it is and returns out as [B, T, H, D]:
    # no view op (and autograd node) on either side, ~58 k instructions per forward + backward (benchmarks/NOTES.md).
    out, _ = _ATTENTION(q, k, v, None, lengths, q.shape[1], dropout_p, softmax_scale, seed,
                        emulated=implementation == "emulated")
    return out


def attention_varlen(q, k, v, cu_seqlens, max_seqlen, *, dropout_p=0.0, softmax_scale=None, generator=None,
                     backend=None):
    """Attention over sequences packed back to back: q, k, v [tokens, H, D]; cu_seqlens [B + 1] int32/int64,
    sequence b being tokens cu_seqlens[b] .. cu_seqlens[b + 1] - 1 (cu_seqlens[0] = 0, cu_seqlens[B] =
    tokens); max_seqlen: an int >= every sequence's length. Dropout and positions count inside each
    sequence, so this equals `attention` on the same sequences padded. Returns [tokens, H, D] in q's dtype."""
    _check_qkv(q, k, v, ("tokens", "heads", "head_dim"))
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"attention_varlen: cu_seqlens must be a 1-D int32/int64 tensor [batch + 1], got "
                         f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"attention_varlen: cu_seqlens must be on q's device {q.device}, got {cu_seqlens.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"attention_varlen: max_seqlen must be a non-negative int, got {max_seqlen!r}")
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int32)
    if cu_seqlens.device.type == "cpu" and backends.has_values(cu_seqlens):
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != q.shape[0]:
            raise ValueError(f"attention_varlen: cu_seqlens must run from 0 to tokens = {q.shape[0]}, got "
                             f"{int(cu_seqlens[0])} to {int(cu_seqlens[-1])}")
        _check_lengths("sequence lengths (differences of cu_seqlens)", lengths, max_seqlen)
    softmax_scale = _check_options(q, dropout_p, softmax_scale)
    implementation = _implementation(q, backend)
    seed = _dropout_seed(q, dropout_p, generator)
    starts = cu_seqlens[:-1].to(torch.int32)
    if implementation == "reference":
        return _varlen_reference(q, k, v, starts, lengths, max_seqlen, dropout_p, softmax_scale, seed)
    out, _ = _ATTENTION(q, k, v, starts, lengths, max_seqlen, dropout_p, softmax_scale, seed,
                        emulated=implementation == "emulated")
    return out


def _varlen_reference(q, k, v, starts, lengths, max_seqlen, dropout_p, softmax_scale, seed):
    """The packed layout through the padded reference: gather into [B, max_seqlen], attend, scatter back."""
    positions = torch.arange(max_seqlen, device=q.device)
    valid = positions < lengths.unsqueeze(1)  # [B, max_seqlen]
    # Padding positions gather an appended zero row (index `tokens`), so that no index leaves the tensors, even
    # with no tokens at all.
    tokens = torch.where(valid, starts.unsqueeze(1) + positions, q.shape[0])
    padded = attention_reference(*(torch.cat([t, t.new_zeros(1, *t.shape[1:])])[tokens] for t in (q, k, v)),
                                 lengths, dropout_p, softmax_scale, seed)
    return torch.zeros_like(q).index_put((tokens[valid],), padded[valid])


def _rows_heads_dim(q, k):
    """(rows, heads, head_dim) of the op's q, rows being its leading sizes: (tokens,) or (batch, max_seqlen). q is
    [*rows, H, D], or [*rows, 3, H, D] packed when k is None."""
    rows = q.shape[:-3] if k is None else q.shape[:-2]
    return tuple(rows), q.shape[-2], q.shape[-1]


@torch.library.register_fake("electra_ext::attention")
def _attention_fake(q, k, v, starts, seqlens, max_seqlen, dropout_p, softmax_scale, seed, *, emulated=False):
    rows, heads, head_dim = _rows_heads_dim(q, k)
    return (q.new_empty((*rows, heads, head_dim)), q.new_empty((heads, math.prod(rows)), dtype=torch.float32))


@torch.library.register_fake("electra_ext::attention_backward")
def _attention_backward_fake(grad_out, q, k, v, out, lse, starts, seqlens, max_seqlen, dropout_p, softmax_scale,
                             seed, *, emulated=False):
    rows, heads, head_dim = _rows_heads_dim(q, k)
    return q.new_empty((*rows, 3, heads, head_dim))


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    q, k, v, starts, seqlens, max_seqlen, dropout_p, softmax_scale, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, starts, seqlens, seed)
    ctx.options = (max_seqlen, dropout_p, softmax_scale)
    ctx.emulated = keyword_only_inputs["emulated"]
    # lse only feeds the backward: no gradient, so autograd keeps no slot for it. out's gradient is not
    # materialised either when out goes unused (no zero-filled tensor and fill kernel per call).
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_lse):
    if grad_out is None:
        return None, None, None, None, None, None, None, None, None
    q, k, v, out, lse, starts, seqlens, seed = ctx.saved_tensors
    max_seqlen, dropout_p, softmax_scale = ctx.options
    grad_qkv = _BACKWARD_OP(grad_out, q, k, v, out, lse, starts, seqlens, max_seqlen, dropout_p, softmax_scale,
                            seed, emulated=ctx.emulated)
    grads = (grad_qkv, None, None) if k is None else grad_qkv.unbind(-3)
    return *grads, None, None, None, None, None, None


_ATTENTION = register_autograd(_OP, _backward, _setup_context)
