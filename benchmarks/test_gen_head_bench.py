"""ops.gen_head (the fused generator head: loss, gradients and the Gumbel sample) against the eager head users
would otherwise write ("eager": F.linear in the inputs' dtype -> cross_entropy in float32 -> Gumbel argmax with
torch's RNG, on the materialised [M, V] logits), the ops' float32 oracle ("reference": the same in float32, its
Gumbel noise by Philox in PyTorch ops, as the kernels draw it: a correctness tool, slow by design) and, on CUDA
where it installs, Liger-Kernel's fused linear cross-entropy (the loss and its gradients only, no sample).

TFLOP/s counts 2 M V E per GEMM pass: one for the forward, three for forward + backward (logits, dh, dW); both
kernels' backward recompute the logits, a fourth pass that is not counted. On CUDA each case also records the
peak memory above its inputs (conftest.py): the target is <= 5% of the eager head's.

Run all:   pytest benchmarks/test_gen_head_bench.py --benchmark-json bench.json
CI (CPU):  pytest benchmarks/ --benchmark-disable   (each case runs once, as a smoke test)
"""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from electra_ext import ops

MASK_RATE = 0.15
VOCAB = 30522  # BERT's uncased WordPiece vocabulary, ELECTRA's
# (masked rows M, embedding size E). CUDA: ELECTRA-Small (128 sequences of 128 tokens, E = 128) and Base (256
# sequences of 512 tokens, E = 768), M = 15% of the tokens. The CPU keeps E and V and takes fewer rows, so that
# CI's single round stays in seconds (the reference holds M x V logits and Philox words).
SHAPES = {
    "cuda": {"small": (int(MASK_RATE * 128 * 128), 128), "base": (int(MASK_RATE * 256 * 512), 768)},
    "cpu": {"small": (256, 128), "base": (64, 768)},
}
GEMM_PASSES = {"fwd": 1, "fwd_bwd": 3}

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]

PROVIDERS = ["electra_ext", "eager", "reference", "liger"]
LIGER_INSTALLED = importlib.util.find_spec("liger_kernel") is not None


def liger_loss(h, weight, bias, targets):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    return LigerFusedLinearCrossEntropyLoss()(weight, h, targets, bias)


def eager_loss(h, weight, bias, targets):
    """The loss; the sample drawn as a training step would (and discarded)."""
    logits = F.linear(h, weight, bias)
    loss = F.cross_entropy(logits.float(), targets)
    with torch.no_grad():  # Gumbel-max: argmax(logits + G), G = -log(E) with E ~ Exponential(1)
        (logits.float() - torch.empty(logits.shape, device=h.device).exponential_().log()).argmax(-1)
    return loss


def head_call(provider, h, weight, bias, targets):
    """The loss of one call; every provider but Liger also draws the sample."""
    if provider == "liger":
        return liger_loss(h, weight, bias, targets)
    if provider == "eager":
        return eager_loss(h, weight, bias, targets)
    return ops.gen_head(h, weight, bias, targets, backend=None if provider == "electra_ext" else "reference").loss


def make_inputs(device, shape):
    rows, hidden = SHAPES[device][shape]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    generator = torch.Generator(device).manual_seed(0)
    h = torch.randn(rows, hidden, generator=generator, device=device, dtype=dtype)
    weight = torch.randn(VOCAB, hidden, generator=generator, device=device, dtype=dtype) / hidden**0.5
    bias = torch.zeros(VOCAB, device=device, dtype=dtype)
    targets = torch.randint(0, VOCAB, (rows,), generator=generator, device=device)
    return h, weight, bias, targets


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shape", ["small", "base"])
@pytest.mark.parametrize("device", DEVICES)
def test_gen_head(timed_benchmark, device, shape, mode, provider):
    if provider == "liger" and (device != "cuda" or not LIGER_INSTALLED):
        pytest.skip("Liger-Kernel runs on CUDA only, where it is installed (pip install liger-kernel)")
    h, weight, bias, targets = make_inputs(device, shape)
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return head_call(provider, h, weight, bias, targets)
    else:
        leaves = tuple(t.requires_grad_() for t in (h, weight, bias))

        def call():
            return torch.autograd.grad(head_call(provider, *leaves, targets), leaves)

    rows, hidden = h.shape
    timed_benchmark(
        call,
        device=device,
        # h and weight read once per GEMM pass, plus the three gradients written for fwd_bwd.
        bytes_per_call=(GEMM_PASSES[mode] + (mode == "fwd_bwd")) * (rows + VOCAB) * hidden * h.element_size(),
        flops=2 * rows * VOCAB * hidden * GEMM_PASSES[mode],
        op="gen_head",
        provider=provider,
        shape=shape,
        mode=mode,
        dtype=str(h.dtype),
        M=rows, V=VOCAB, E=hidden,
    )
