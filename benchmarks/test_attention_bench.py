"""ops.attention (its packed-QKV form, as the encoder calls it) against PyTorch's scaled_dot_product_attention and
the math reference, each on one fused QKV projection's output.

SDPA with a padding mask (a boolean attn_mask) can only use its memory-efficient or cuDNN backends; without one
it also has flash. Each case runs with no padding and with ~15% padding (lengths spread evenly from 70% to 100%
of T), forward, backward alone and forward + backward, in bf16 on CUDA and float32 on the CPU. On CUDA, forward +
backward also runs captured in a CUDA graph (mode fwd_bwd_graph): the kernels' device time without the host's.

TFLOP/s counts the work on valid tokens: 4 * H * D * sum_b(len_b^2) per forward (q k^T and P v), 2.5x that per
backward (five products, FlashAttention's convention), 3.5x for forward + backward.

Run all:   pytest benchmarks/test_attention_bench.py --benchmark-json bench.json
CI (CPU):  pytest benchmarks/ --benchmark-disable   (each case runs once, as a smoke test)
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from electra_ext import BUILD_INFO, ops
from electra_ext.ops.reference import attention_reference

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


def sdpa(qkv, seqlens):
    """PyTorch's attention on the [B, T, H, D] views of qkv; padding as a boolean key mask (None: no mask, flash
    allowed)."""
    q, k, v = qkv.unbind(2)
    mask = None
    if seqlens is not None:
        mask = (torch.arange(q.shape[1], device=q.device) < seqlens.unsqueeze(1))[:, None, None, :]
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask)
    return out.transpose(1, 2)


# Each provider as an encoder calls it on its fused QKV projection's output [B, T, 3, H, D].
PROVIDERS = {
    "electra_ext": lambda qkv, seqlens: ops.attention_qkvpacked(qkv, seqlens=seqlens),
    "sdpa": sdpa,
    "reference": lambda qkv, seqlens: attention_reference(*qkv.unbind(2), seqlens, 0.0, qkv.shape[-1] ** -0.5,
                                                          None),
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
CASES = [("cpu", provider) for provider in PROVIDERS] + [
    pytest.param("cuda", provider, marks=CUDA_MARKS) for provider in [*PROVIDERS, *ELECTRA_EXT_VARIANTS]]


def make_inputs(device, shape, padding):
    batch, seq_len, heads, head_dim = SHAPES[device][shape]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    generator = torch.Generator(device).manual_seed(0)
    # One fused projection output, as the encoder produces.
    qkv = torch.randn(batch, seq_len, 3, heads, head_dim, device=device, dtype=dtype, generator=generator)
    seqlens = None
    if PADDINGS[padding]:
        fraction = torch.linspace(1.0 - 2 * PADDINGS[padding], 1.0, batch, device=device)
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
    """(attend, qkv, seqlens, grad_out) of one case, with the mma.sync variant's setting made (or the case skipped
    where it would time the same kernels as electra_ext)."""
    if provider == MMA_SYNC:
        if not (BUILD_INFO.WITH_SM90A and torch.cuda.get_device_capability() == (9, 0)):
            pytest.skip("electra_ext runs the mma.sync kernels here already (no sm_90a code in this build, or not a "
                        "compute capability 9.0 card)")
        monkeypatch.setenv("ELECTRA_EXT_WGMMA", "0")
    qkv, seqlens = make_inputs(device, shape, padding)
    attend = PROVIDERS["electra_ext" if provider in ELECTRA_EXT_VARIANTS else provider]
    batch, seq_len, _, heads, head_dim = qkv.shape
    grad_out = torch.randn(batch, seq_len, heads, head_dim, device=device, dtype=qkv.dtype)
    return attend, qkv, seqlens, grad_out


def case_info(qkv, seqlens, grad_out, provider, shape, padding, mode):
    """What summarize.py reads of a case, besides its time."""
    batch, seq_len, _, heads, head_dim = qkv.shape
    flops = forward_flops(seq_len, heads, head_dim, batch, seqlens)
    forward_backward = 1.0 + BACKWARD_FLOPS_FACTOR
    flops *= {"fwd": 1.0, "bwd": BACKWARD_FLOPS_FACTOR, "fwd_bwd": forward_backward,
              "fwd_bwd_graph": forward_backward}[mode]
    return dict(
        device=qkv.device.type,
        bytes_per_call=4 * grad_out.numel() * qkv.element_size(),  # q, k, v read and out written once
        flops=flops,
        op="attention",
        provider=provider,
        shape=f"{shape}-{padding}",
        mode=mode,
        dtype=str(qkv.dtype),
        B=batch, T=seq_len, H=heads, D=head_dim,
    )


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd_bwd"])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("shape", ["small", "base", "host"])
@pytest.mark.parametrize("device,provider", CASES)
def test_attention(timed_benchmark, monkeypatch, device, shape, padding, mode, provider):
    attend, qkv, seqlens, grad_out = attention_case(monkeypatch, device, shape, padding, provider)
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return attend(qkv, seqlens)
    elif mode == "bwd":
        out = attend(qkv, seqlens)

        def call():
            return torch.autograd.grad(out, qkv, grad_out, retain_graph=True)
    else:
        def call():
            return torch.autograd.grad(attend(qkv, seqlens), qkv, grad_out)

    with deterministic_algorithms(provider == DETERMINISTIC):
        timed_benchmark(call, **case_info(qkv, seqlens, grad_out, provider, shape, padding, mode))


def cuda_graph_replay(call):
    """call captured once in a CUDA graph, after warm-up calls on a side stream (as torch.cuda.graph asks: they
    fill the caching allocator and leave no first-call work in the capture); returns the graph's replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("shape", ["small", "base"])
@pytest.mark.parametrize("provider", [pytest.param(provider, marks=CUDA_MARKS)
                                      for provider in ("electra_ext", MMA_SYNC, "sdpa")])
def test_attention_cuda_graph(timed_benchmark, monkeypatch, shape, padding, provider):
    """Forward + backward captured in a CUDA graph and replayed: the kernels' device time with no host time between
    them, as in a training step whose host runs ahead of the device, or one captured whole (torch.compile's
    mode="reduce-overhead"). At ELECTRA-Small an eager call's host time is longer than its kernels
    (benchmarks/NOTES.md), so test_attention's fwd_bwd times the host there; this times the kernels, SDPA's
    under the same capture."""
    attend, qkv, seqlens, grad_out = attention_case(monkeypatch, "cuda", shape, padding, provider)
    replay = cuda_graph_replay(lambda: torch.autograd.grad(attend(qkv, seqlens), qkv, grad_out))
    # The graph's memory is its own pool, allocated at capture: a replay allocates nothing to measure.
    timed_benchmark(replay, measure_peak=False,
                    **case_info(qkv, seqlens, grad_out, provider, shape, padding, "fwd_bwd_graph"))
