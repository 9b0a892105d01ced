"""gen_head: ELECTRA's tied-embedding generator head on the masked rows only.

    logits = h weightᵀ + bias                   [M, V], never held whole by the kernel
    loss   = mean cross-entropy over rows whose target is not ignore_index; 0 when there are none
    sample = argmax(logits / temperature + Gumbel noise), without gradient

The Gumbel noise of (row, column) is keyed by Philox with a seed drawn from `generator`
(csrc/common/philox.h), so a sample depends only on (seed, row, column): the CPU kernel and the reference draw the
same tokens from float32 inputs, whatever the tiling or the thread count.

Kernels: CPU float32, bfloat16 and float16 (csrc/cpu/gen_head_cpu.cpp: tiles of 128 rows x 1024 columns, float32
accumulation, ~1 MiB of scratch per thread); CUDA float16 and bfloat16 h, the weight cast to h's dtype as autocast
would (csrc/cuda/gen_head_device.cuh: tensor-core logit tiles with fused epilogues, float32 accumulation; the
backward holds a 64 MiB workspace, ELECTRA_EXT_GEN_HEAD_WORKSPACE_MIB). On CUDA a target outside [0, V) that is
not ignore_index makes the loss NaN (checking it would synchronise the device); elsewhere it is a ValueError.
Everything else (float64, float32 h on CUDA) runs the pure-PyTorch reference (electra_ext/ops/reference.py),
which materialises [M, V].
Rows with target == ignore_index let callers pass a fixed number of rows (e.g. max predictions per sequence),
which keeps shapes static under torch.compile.
"""
import math
from typing import NamedTuple

import torch

from electra_ext.ops import backend as backends
from electra_ext.ops.eager_autograd import register_autograd
from electra_ext.ops.reference import gen_head_reference, philox_seed

_OP = torch.ops.electra_ext.gen_head
_BACKWARD_OP = torch.ops.electra_ext.gen_head_backward.default

CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


CUDA_KERNEL_DTYPES = (torch.float16, torch.bfloat16)

_SELECT = backends.Selector(_OP.default)


class GenHeadOutput(NamedTuple):
    loss: torch.Tensor         # float32 scalar (float64 for float64 inputs), with gradient to h, weight, bias
    samples: torch.Tensor      # [M] int64: Gumbel-max samples (any value on ignored rows)
    lse: torch.Tensor          # [M] float32 (float64 for float64 inputs): log-sum-exp of each row's logits
    num_correct: torch.Tensor  # int64 scalar: counted rows whose argmax is the target


def _implementation(h, weight, bias, backend):
    """"kernels", "emulated" or "reference" for these inputs (see electra_ext.ops.backend)."""
    device = h.device.type
    implementation = _SELECT(backend, h.device)
    if implementation == "emulated" and h.dtype not in CUDA_KERNEL_DTYPES:
        raise ValueError(f"gen_head: backend='emulated' runs the CUDA kernels, which take float16/bfloat16 h; "
                         f"got {h.dtype}")
    if implementation == "kernels":
        dtypes = CPU_KERNEL_DTYPES if device == "cpu" else CUDA_KERNEL_DTYPES
        if h.dtype not in dtypes or not all(t.dtype in CPU_KERNEL_DTYPES for t in (weight, bias)):
            return "reference"
    return implementation


def _check_targets(targets, vocab, ignore_index):
    """Targets in [0, V) or equal to ignore_index, checked where that costs no device synchronisation (CPU
    tensors, eager); the kernels check again before they read a target's column."""
    if targets.device.type != "cpu" or not backends.has_values(targets) or not targets.numel():
        return
    counted = targets[targets != ignore_index]
    if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= vocab):
        bad = counted[(counted < 0) | (counted >= vocab)][0]
        raise ValueError(f"gen_head: targets must lie in [0, V = {vocab}) or equal ignore_index ({ignore_index}), "
                         f"got {int(bad)}")


def gen_head(h, weight, bias, targets, *, temperature=1.0, generator=None, disallow_correct=False,
             ignore_index=-100, backend=None):
    """h: [M, E] float; weight: [V, E] (the tied word embeddings); bias: [V]; targets: [M] int64 token ids
    or ignore_index. generator: torch.Generator for the seed of the Gumbel noise (torch's default generator for
    h's device when None). disallow_correct: the target can never be sampled. backend: see
    electra_ext.ops.backend (None: the default). Returns a GenHeadOutput."""
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
    if not (h.device == weight.device == bias.device == targets.device):
        raise ValueError(f"gen_head: h, weight, bias and targets must be on one device, got {h.device}, "
                         f"{weight.device}, {bias.device}, {targets.device}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"gen_head: temperature must be a positive number, got {temperature!r}")
    if disallow_correct and weight.shape[0] < 2:
        raise ValueError("gen_head: disallow_correct needs a vocabulary of at least 2 tokens")
    _check_targets(targets, weight.shape[0], ignore_index)
    implementation = _implementation(h, weight, bias, backend)
    seed = philox_seed(h.device, generator)
    if implementation == "reference":
        return GenHeadOutput(*gen_head_reference(h, weight, bias, targets, temperature, seed, disallow_correct,
                                                 ignore_index))
    return GenHeadOutput(*_GEN_HEAD(h, weight, bias, targets, seed, float(temperature), bool(disallow_correct),
                                    int(ignore_index), emulated=implementation == "emulated"))


@torch.library.register_fake("electra_ext::gen_head")
def _gen_head_fake(h, weight, bias, targets, seed, temperature, disallow_correct, ignore_index, *, emulated=False):
    rows = h.shape[0]
    return (h.new_empty((), dtype=torch.float32), h.new_empty((rows,), dtype=torch.int64),
            h.new_empty((rows,), dtype=torch.float32), h.new_empty((), dtype=torch.int64))


@torch.library.register_fake("electra_ext::gen_head_backward")
def _gen_head_backward_fake(grad_loss, h, weight, bias, targets, lse, ignore_index, *, emulated=False):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (h, weight, bias))


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    h, weight, bias, targets, seed, temperature, disallow_correct, ignore_index = inputs
    _, samples, lse, num_correct = output
    ctx.save_for_backward(h, weight, bias, targets, lse)
    ctx.mark_non_differentiable(samples, lse, num_correct)
    ctx.ignore_index = ignore_index
    ctx.emulated = keyword_only_inputs["emulated"]


def _backward(ctx, grad_loss, grad_samples, grad_lse, grad_num_correct):
    h, weight, bias, targets, lse = ctx.saved_tensors
    grad_h, grad_weight, grad_bias = _BACKWARD_OP(grad_loss, h, weight, bias, targets, lse, ctx.ignore_index,
                                                  emulated=ctx.emulated)
    return grad_h, grad_weight, grad_bias, None, None, None, None, None


_GEN_HEAD = register_autograd(_OP, _backward, _setup_context)
