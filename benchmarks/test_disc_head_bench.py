"""disc_head against its PyTorch reference, eager and compiled, and the card's copy bandwidth.

Run all:   pytest benchmarks/ --benchmark-json bench.json
CI (CPU):  pytest benchmarks/ --benchmark-disable   (each case runs once, as a smoke test)
"""

import pytest
import torch

from electra_ext import ops
from electra_ext.ops.reference import disc_head_reference

# (sequences, tokens per sequence, hidden): "small" is a 128-token ELECTRA-small batch,
# "base" a 512-token ELECTRA-base batch; N = sequences * tokens.
SHAPES = {"small": (128, 128, 256), "base": (256, 512, 768)}
REPLACED_RATE = 0.15  # ELECTRA masks 15% of tokens for its generator; taken here as all replaced
PADDING_FRACTION = 0.1  # the last 10% of each sequence is padding (valid == False)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
]
CUDA_ONLY = DEVICES[1:]
# 2 GiB of bf16, ~40x the H100/H200 L2 (50-60 MB), so the copy streams from and to HBM.
COPY_ELEMENTS = 1 << 30


def compiled_reference():
    # Dynamo's cache of compiled variants lives on the function's code object and holds 8 by
    # default, exactly the 2 devices x 2 shapes x 2 modes here; resetting makes each case compile
    # its own variant once, in its warm-up round, whichever cases ran before it.
    torch._dynamo.reset()
    return torch.compile(disc_head_reference, dynamic=False)


PROVIDERS = {
    "electra_ext": lambda: ops.disc_head,
    "reference": lambda: disc_head_reference,
    "reference_compiled": compiled_reference,
}


def make_inputs(shape, device, requires_grad):
    sequences, tokens, hidden = SHAPES[shape]
    rows = sequences * tokens
    generator = torch.Generator(device).manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(rows, hidden, generator=generator, device=device, dtype=dtype)
    w = torch.randn(hidden, generator=generator, device=device) / hidden**0.5
    b = torch.zeros(1, device=device)
    labels = torch.rand(rows, generator=generator, device=device) < REPLACED_RATE
    position = torch.arange(tokens, device=device).repeat(sequences)
    valid = position < tokens - int(tokens * PADDING_FRACTION)
    for tensor in (x, w, b):
        tensor.requires_grad_(requires_grad)
    return x, w, b, labels, valid


def bytes_per_call(rows, hidden, element_size, mode):
    # One pass reads x, writes fp32 logits and reads the two bool masks; w (4*hidden bytes) is
    # negligible. The backward pass reads x again and writes dx, the same size as x.
    row_terms = rows * (4 + 2)
    if mode == "fwd":
        return rows * hidden * element_size + row_terms
    return 3 * rows * hidden * element_size + 2 * row_terms


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("device", DEVICES)
def test_disc_head(timed_benchmark, device, shape, mode, provider):
    x, w, b, labels, valid = make_inputs(shape, device, requires_grad=mode == "fwd_bwd")
    disc_head = PROVIDERS[provider]()

    def call():
        logits, loss = disc_head(x, w, b, labels, valid)
        if mode == "fwd_bwd":
            return torch.autograd.grad(loss, (x, w, b))
        return logits, loss

    rows, hidden = x.shape
    timed_benchmark(
        call,
        device=device,
        bytes_per_call=bytes_per_call(rows, hidden, x.element_size(), mode),
        op="disc_head",
        provider=provider,
        shape=shape,
        mode=mode,
        dtype=str(x.dtype),
        N=rows,
        H=hidden,
    )


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_copy_bandwidth(timed_benchmark, device):
    """The 100% mark for summarize.py: a device-to-device copy, counting bytes read and written."""
    source = torch.empty(COPY_ELEMENTS, dtype=torch.bfloat16, device=device)
    destination = torch.empty_like(source)
    timed_benchmark(
        lambda: destination.copy_(source),
        device=device,
        bytes_per_call=2 * source.nbytes,
        provider="copy",
        shape="2GiB",
        mode="copy",
        dtype=str(source.dtype),
        N=COPY_ELEMENTS,
        H=1,
    )
