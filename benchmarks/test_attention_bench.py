"""ops.attention (its packed-QKV form, as the encoder calls it, on one fused QKV projection's output) against
PyTorch's scaled_dot_product_attention as a transformers model calls it (q, k and v from separate projections,
padding as a boolean key mask built once per batch) and the math reference.

SDPA is timed as it dispatches by itself ("sdpa", the backend it chose recorded as sdpa_backend) and, on CUDA,
forced to each of its backends ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn"; a backend that refuses the case,
CUDA's flash with a mask for one, skips it), and with padding also on nested jagged tensors of the valid tokens only
("sdpa-varlen": flash's variable-length kernels, the same padding with nothing computed for it). summarize.py
takes the fastest of these as the baseline. Each case runs with no padding and with ~15% padding (lengths spread
evenly from 70% to 100% of T), forward, backward alone and forward + backward, in bf16 on CUDA and float32 on the
CPU. On CUDA, forward + backward also runs captured in a CUDA graph (mode fwd_bwd_graph): the kernels' device time
without the host's.

TFLOP/s counts the work on valid tokens: 4 * H * D * sum_b(len_b^2) per forward (q k^T and P v), 2.5x that per
backward (five products, FlashAttention's convention), 3.5x for forward + backward.

Run all:   pytest benchmarks/test_attention_bench.py --benchmark-json bench.json
CI (CPU):  pytest benchmarks/ --benchmark-disable   (each case runs once, as a smoke test)
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from electra_ext import BUILD_INFO, ops
from electra_ext.ops.reference import attention_reference, key_padding_mask

# (batch, seq_len, heads, head_dim). ELECTRA-Small (B=128, T=128, H=4) and Base (B=32, T=512, H=12) on CUDA; the
# CPU runs the same sequence lengths on fewer sequences, so that CI's single round stays in seconds. "host": one
# 16-token sequence and head, whose kernels take microseconds, so that a call's time is its host cost (Python,
# autograd, dispatch, launches), the part that paces ELECTRA-Small's layers on a GPU.
HOST_SHAPE = (1, 16, 1, 64)
SHAPES = {
    "cuda": {"small": (128, 128, 4, 64), "base": (32, 512, 12, 64), "host": HOST_SHAPE},
    "cpu": {"small": (8, 128, 4, 64), "base": (2, 512, 12, 64), "host": HOST_SHAPE},
}
PADDINGS = {"nopad": 0.0, "pad15": 0.15}
BACKWARD_FLOPS_FACTOR = 2.5

CUDA_MARKS = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


class Attention:
    """One provider's case: attend() gives the output, whose gradient is taken with respect to `leaves`, with
    `grad_out` as the output's gradient (each in the form the provider takes)."""

    def __init__(self, attend, leaves, grad_out, **info):
        self.attend, self.leaves, self.grad_out, self.info = attend, leaves, grad_out, info


def electra_ext_attention(qkv, seqlens, grad_out):
    return Attention(lambda: ops.attention_qkvpacked(qkv, seqlens=seqlens), (qkv,), grad_out)


def reference_attention(qkv, seqlens, grad_out):
    scale = qkv.shape[-1] ** -0.5
    return Attention(lambda: attention_reference(*qkv.unbind(2), seqlens, 0.0, scale, None), (qkv,), grad_out)


def separate_projections(qkv):
    """q, k and v as three projections' outputs [B, T, H, D], each its own leaf: their gradients are SDPA's
    own, where views of one tensor would add a copy that stacks them."""
    return tuple(t.detach().contiguous().requires_grad_() for t in qkv.unbind(-3))


def sdpa_attention(backend=None):
    def build(qkv, seqlens, grad_out):
        q, k, v = (t.transpose(1, 2) for t in separate_projections(qkv))
        mask = None
        if seqlens is not None:
            mask = key_padding_mask(seqlens, qkv.shape[1])[:, None, None, :]

        def attend():
            with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)

        if backend is not None:
            try:  # forward and backward: a backend may take a case's forward and not its backward
                torch.autograd.grad(attend(), (q, k, v), grad_out)
            except RuntimeError as error:  # "No available kernel", with the backend's reasons as warnings
                pytest.skip(f"SDPA's {backend.name} backend does not take this case: {error}")
        chosen = backend if backend is not None else SDPBackend(torch._fused_sdp_choice(q, k, v, attn_mask=mask))
        return Attention(attend, (q, k, v), grad_out, sdpa_backend=chosen.name)

    return build


def sdpa_varlen_attention(qkv, seqlens, grad_out):
    """SDPA on nested jagged tensors [B, j, H, D] made of the valid tokens alone, packed [tokens, H, D]."""
    if seqlens is None:
        pytest.skip("without padding the nested tensors are the dense ones: sdpa-flash times that")
    valid = key_padding_mask(seqlens, qkv.shape[1])
    q, k, v = separate_projections(qkv[valid])
    offsets = F.pad(seqlens.long().cumsum(0), (1, 0))
    # Given, so that SDPA does not read them from the device on every call (a sync, and no CUDA graph).
    min_seqlen, max_seqlen = int(seqlens.min()), int(seqlens.max())

    def nested(values):
        return torch.nested.nested_tensor_from_jagged(values, offsets, min_seqlen=min_seqlen, max_seqlen=max_seqlen)

    def attend():
        out = F.scaled_dot_product_attention(*(nested(t).transpose(1, 2) for t in (q, k, v)))
        return out.transpose(1, 2)

    return Attention(attend, (q, k, v), nested(grad_out[valid]))


# Each provider as an encoder calls it; given the fused QKV projection's output [B, T, 3, H, D].
PROVIDERS = {
    "electra_ext": electra_ext_attention,
    "sdpa": sdpa_attention(),
    "reference": reference_attention,
}
# SDPA forced to each backend, and on nested tensors; the CPU has flash and nested tensors (the others are CUDA's),
# so that CI runs each code path once.
SDPA_VARIANTS = {
    "sdpa-flash": sdpa_attention(SDPBackend.FLASH_ATTENTION),
    "sdpa-efficient": sdpa_attention(SDPBackend.EFFICIENT_ATTENTION),
    "sdpa-cudnn": sdpa_attention(SDPBackend.CUDNN_ATTENTION),
    "sdpa-varlen": sdpa_varlen_attention,
}
# On CUDA, electra_ext's backward under torch.use_deterministic_algorithms(True): the dQ kernel recomputes S and
# dP (7 tile products instead of 5) where the default adds dQ over key blocks with atomics. The CPU kernels have
# one path.
DETERMINISTIC = "electra_ext-deterministic"
# On a compute capability 9.0 card with a _C built with sm_90a code (BUILD_INFO.WITH_SM90A), electra_ext runs the
# wgmma forward and dK/dV kernel; this is the same build's mma.sync kernels (ELECTRA_EXT_WGMMA=0), so that one run
# times both kinds side by side. Elsewhere electra_ext is the mma.sync kernels already, and this case skips.
MMA_SYNC = "electra_ext-mma_sync"
ELECTRA_EXT_VARIANTS = (DETERMINISTIC, MMA_SYNC)
CPU_SDPA_VARIANTS = ("sdpa-flash", "sdpa-varlen")
CASES = [("cpu", provider) for provider in [*PROVIDERS, *CPU_SDPA_VARIANTS]] + [
    pytest.param("cuda", provider, marks=CUDA_MARKS)
    for provider in [*PROVIDERS, *ELECTRA_EXT_VARIANTS, *SDPA_VARIANTS]]


def make_inputs(device, shape, padding):
    batch, seq_len, heads, head_dim = SHAPES[device][shape]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    generator = torch.Generator(device).manual_seed(0)
    # One fused projection output, as the encoder produces.
    qkv = torch.randn(batch, seq_len, 3, heads, head_dim, device=device, dtype=dtype, generator=generator)
    seqlens = None
    if PADDINGS[padding]:
        # Lengths spread evenly, the mean at 1 - padding (a single sequence: that mean).
        low = 1.0 - 2 * PADDINGS[padding] if batch > 1 else 1.0 - PADDINGS[padding]
        fraction = torch.linspace(low, 1.0 if batch > 1 else low, batch, device=device)
        seqlens = (fraction * seq_len).round().to(torch.int32)
    return qkv.requires_grad_(), seqlens


def forward_flops(seq_len, heads, head_dim, batch, seqlens):
    squared_lengths = batch * seq_len**2 if seqlens is None else int((seqlens.long() ** 2).sum())
    return 4 * heads * head_dim * squared_lengths


@contextlib.contextmanager
def deterministic_algorithms(on):
    """torch.use_deterministic_algorithms(on) without its NaN fill of every new tensor (not part of what is timed),
    restored after."""
    was_on = torch.are_deterministic_algorithms_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(on)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_on)
        torch.utils.deterministic.fill_uninitialized_memory = was_filling


def attention_case(monkeypatch, device, shape, padding, provider):
    """(Attention, qkv, seqlens) of one case, with the mma.sync variant's setting made (or the case skipped where
    it would time the same kernels as electra_ext)."""
    if provider == MMA_SYNC:
        if not (BUILD_INFO.WITH_SM90A and torch.cuda.get_device_capability() == (9, 0)):
            pytest.skip("electra_ext runs the mma.sync kernels here already (no sm_90a code in this build, or not a "
                        "compute capability 9.0 card)")
        monkeypatch.setenv("ELECTRA_EXT_WGMMA", "0")
    qkv, seqlens = make_inputs(device, shape, padding)
    build = {**PROVIDERS, **SDPA_VARIANTS}["electra_ext" if provider in ELECTRA_EXT_VARIANTS else provider]
    batch, seq_len, _, heads, head_dim = qkv.shape
    grad_out = torch.randn(batch, seq_len, heads, head_dim, device=device, dtype=qkv.dtype)
    return build(qkv, seqlens, grad_out), qkv, seqlens


def gradients(attention):
    return torch.autograd.grad(attention.attend(), attention.leaves, attention.grad_out)


def case_info(attention, qkv, seqlens, provider, shape, padding, mode):
    """What summarize.py reads of a case, besides its time."""
    batch, seq_len, _, heads, head_dim = qkv.shape
    flops = forward_flops(seq_len, heads, head_dim, batch, seqlens)
    forward_backward = 1.0 + BACKWARD_FLOPS_FACTOR
    flops *= {"fwd": 1.0, "bwd": BACKWARD_FLOPS_FACTOR, "fwd_bwd": forward_backward,
              "fwd_bwd_graph": forward_backward}[mode]
    return dict(
        device=qkv.device.type,
        bytes_per_call=4 * qkv.numel() // 3 * qkv.element_size(),  # q, k, v read and out written once
        flops=flops,
        op="attention",
        provider=provider,
        shape=f"{shape}-{padding}",
        mode=mode,
        dtype=str(qkv.dtype),
        B=batch, T=seq_len, H=heads, D=head_dim,
        **attention.info,
    )


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd_bwd"])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("shape", ["small", "base", "host"])
@pytest.mark.parametrize("device,provider", CASES)
def test_attention(timed_benchmark, monkeypatch, device, shape, padding, mode, provider):
    if provider == DETERMINISTIC and mode == "fwd":
        pytest.skip("deterministic algorithms change the backward only: this forward is electra_ext's")
    attention, qkv, seqlens = attention_case(monkeypatch, device, shape, padding, provider)
    if mode == "fwd":
        def call():
            with torch.no_grad():
                out = attention.attend()
            return out.values() if out.is_nested else out
    elif mode == "bwd":
        out = attention.attend()

        def call():
            return torch.autograd.grad(out, attention.leaves, attention.grad_out, retain_graph=True)
    else:
        def call():
            return gradients(attention)

    with deterministic_algorithms(provider == DETERMINISTIC):
        timed_benchmark(call, **case_info(attention, qkv, seqlens, provider, shape, padding, mode))


def cuda_graph_replay(call):
    """call captured once in a CUDA graph, after warm-up calls on a side stream (as torch.cuda.graph asks: they
    fill the caching allocator and leave no first-call work in the capture); returns (the graph's replay, which
    returns the captured call's outputs, now the replay's, and the last warm-up call's outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            eager = call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()

    def replay():
        graph.replay()
        return captured

    return replay, eager


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("shape", ["small", "base"])
@pytest.mark.parametrize("provider", [pytest.param(provider, marks=CUDA_MARKS)
                                      for provider in ("electra_ext", MMA_SYNC, "sdpa", *SDPA_VARIANTS)])
def test_attention_cuda_graph(timed_benchmark, monkeypatch, shape, padding, provider):
    """Forward + backward captured in a CUDA graph and replayed: the kernels' device time with no host time between
    them, as in a training step whose host runs ahead of the device, or one captured whole (torch.compile's
    mode="reduce-overhead"). At ELECTRA-Small an eager call's host time is longer than its kernels
    (benchmarks/NOTES.md), so test_attention's fwd_bwd times the host there; this times the kernels, SDPA's
    under the same capture. A replay must give the eager call's gradients (to bf16 rounding: the dQ sums' order
    varies), so that a capture that left work out cannot pass as fast."""
    attention, qkv, seqlens = attention_case(monkeypatch, "cuda", shape, padding, provider)
    replay, eager = cuda_graph_replay(lambda: gradients(attention))
    torch.testing.assert_close(replay(), eager, rtol=2e-2, atol=2e-2)
    # The graph's memory is its own pool, allocated at capture: a replay allocates nothing to measure.
    timed_benchmark(replay, measure_peak=False,
                    **case_info(attention, qkv, seqlens, provider, shape, padding, "fwd_bwd_graph"))
