"""ops.attention against PyTorch's scaled_dot_product_attention and the math reference.

SDPA with a padding mask (a boolean attn_mask) can only use its memory-efficient or cuDNN backends; without one
it also has flash. Each case runs with no padding and with ~15% padding (lengths spread evenly from 70% to 100%
of T), forward, backward alone and forward + backward, in bf16 on CUDA and float32 on the CPU.

TFLOP/s counts the work on valid tokens: 4 * H * D * sum_b(len_b^2) per forward (q k^T and P v), 2.5x that per
backward (five products, FlashAttention's convention), 3.5x for forward + backward.

Run all:   pytest benchmarks/test_attention_bench.py --benchmark-json bench.json
CI (CPU):  pytest benchmarks/ --benchmark-disable   (each case runs once, as a smoke test)
"""

import pytest
import torch
import torch.nn.functional as F

from electra_ext import ops
from electra_ext.ops.reference import attention_reference

# (batch, seq_len, heads, head_dim). ELECTRA-Small (B=128, T=128, H=4) and Base (B=32, T=512, H=12) on CUDA; the
# CPU runs the same sequence lengths on fewer sequences, so that CI's single round stays in seconds.
SHAPES = {
    "cuda": {"small": (128, 128, 4, 64), "base": (32, 512, 12, 64)},
    "cpu": {"small": (8, 128, 4, 64), "base": (2, 512, 12, 64)},
}
PADDINGS = {"nopad": 0.0, "pad15": 0.15}
BACKWARD_FLOPS_FACTOR = 2.5

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


def sdpa(q, k, v, seqlens):
    """PyTorch's attention on [B, T, H, D] views; padding as a boolean key mask (None: no mask, flash allowed)."""
    mask = None
    if seqlens is not None:
        mask = (torch.arange(q.shape[1], device=q.device) < seqlens.unsqueeze(1))[:, None, None, :]
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask)
    return out.transpose(1, 2)


PROVIDERS = {
    "electra_ext": lambda q, k, v, seqlens: ops.attention(q, k, v, seqlens=seqlens),
    "sdpa": sdpa,
    "reference": lambda q, k, v, seqlens: attention_reference(q, k, v, seqlens, 0.0, q.shape[-1] ** -0.5, None),
}


def make_inputs(device, shape, padding):
    batch, seq_len, heads, head_dim = SHAPES[device][shape]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    generator = torch.Generator(device).manual_seed(0)
    # One fused projection output, as the encoder produces: q, k, v are strided views of it.
    qkv = torch.randn(batch, seq_len, 3, heads, head_dim, device=device, dtype=dtype, generator=generator)
    q, k, v = (t.requires_grad_() for t in qkv.requires_grad_().unbind(2))
    seqlens = None
    if PADDINGS[padding]:
        fraction = torch.linspace(1.0 - 2 * PADDINGS[padding], 1.0, batch, device=device)
        seqlens = (fraction * seq_len).round().to(torch.int32)
    return qkv, (q, k, v), seqlens


def forward_flops(seq_len, heads, head_dim, batch, seqlens):
    squared_lengths = batch * seq_len**2 if seqlens is None else int((seqlens.long() ** 2).sum())
    return 4 * heads * head_dim * squared_lengths


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd_bwd"])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("shape", ["small", "base"])
@pytest.mark.parametrize("device", DEVICES)
def test_attention(timed_benchmark, device, shape, padding, mode, provider):
    qkv, (q, k, v), seqlens = make_inputs(device, shape, padding)
    attend = PROVIDERS[provider]
    grad_out = torch.randn_like(q)
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return attend(q, k, v, seqlens)
    elif mode == "bwd":
        out = attend(q, k, v, seqlens)

        def call():
            return torch.autograd.grad(out, qkv, grad_out, retain_graph=True)
    else:
        def call():
            return torch.autograd.grad(attend(q, k, v, seqlens), qkv, grad_out)

    batch, seq_len, heads, head_dim = q.shape
    flops = forward_flops(seq_len, heads, head_dim, batch, seqlens)
    flops *= {"fwd": 1.0, "bwd": BACKWARD_FLOPS_FACTOR, "fwd_bwd": 1.0 + BACKWARD_FLOPS_FACTOR}[mode]
    timed_benchmark(
        call,
        device=device,
        bytes_per_call=4 * q.numel() * q.element_size(),  # q, k, v read and out written once
        flops=flops,
        op="attention",
        provider=provider,
        shape=f"{shape}-{padding}",
        mode=mode,
        dtype=str(q.dtype),
        B=batch, T=seq_len, H=heads, D=head_dim,
    )
