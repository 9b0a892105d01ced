"""Property-based tests (hypothesis) of every op against its float64 reference, on random shapes, dtypes, masks and
strides, on the CPU kernels and on the CUDA kernels' device code under the SIMT emulation.

The rule is the one of the op tests: float32 within 1e-5 of the float64 reference (relative to the output's
magnitude), 16-bit inputs within twice the error of PyTorch's own computation in that dtype. Examples are
derandomized (the same ones every run), so CI is reproducible; 200 per op and path.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from electra_ext.ops import attention, disc_head, gen_head
from electra_ext.ops.reference import disc_head_reference

EXAMPLES = 200
PROPERTY_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow])
PATHS = {"cpu": None, "emulated": "emulated"}
DTYPES = {"cpu": [torch.float32, torch.bfloat16, torch.float16], "emulated": [torch.float32, torch.bfloat16,
                                                                               torch.float16]}


def max_error(actual, expected):
    return (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0


def check_outputs(names, actual, expected, pytorch, dtype):
    """float32: max error <= 1e-5 * max(1, max |expected|); 16-bit: <= 2x PyTorch's own error in dtype plus one
    unit in the last place of the largest expected value. The strict 2x rule is the op tests' on fixed shapes;
    on random tiny ones (2 keys, 1 row) the few roundings of either side do not average out, and the measured
    ratio reaches 2.1x (attention's dk, T = 2: the kernel rounds dS to bfloat16 for the tensor cores, PyTorch
    rounds other intermediates). Any indexing or masking bug is off by the size of the values, not by an ulp."""
    for name, a, e, p in zip(names, actual, expected, pytorch):
        scale = max(1.0, e.abs().max().item() if e.numel() else 0.0)
        if dtype == torch.float32:
            assert max_error(a, e) <= 1e-5 * scale, name
        else:
            ulp = torch.finfo(dtype).eps * scale
            assert max_error(a, e) <= 2 * max_error(p, e) + ulp, f"{name}: PyTorch {max_error(p, e)}"


def strided(t, generator, contiguous):
    """t itself, or the same values as a view with row stride 2 * cols + 1 (unaligned, non-contiguous)."""
    if contiguous or t.dim() != 2:
        return t
    wide = torch.randn(t.shape[0], 2 * t.shape[1] + 1, generator=generator).to(t.dtype)
    wide[:, 1::2] = t
    return wide[:, 1::2]


# --- disc_head ---

@pytest.mark.parametrize("path", PATHS)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_disc_head_matches_reference(path, data):
    rows = data.draw(st.integers(0, 40), label="rows")
    hidden = data.draw(st.integers(1, 64), label="hidden")
    dtype = data.draw(st.sampled_from(DTYPES[path]), label="dtype")
    valid_fraction = data.draw(st.sampled_from([0.0, 0.5, 1.0]), label="valid_fraction")
    contiguous = data.draw(st.booleans(), label="contiguous")
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    x = strided(torch.randn(rows, hidden, generator=generator).to(dtype), generator, contiguous)
    w = torch.randn(hidden, generator=generator) / hidden**0.5
    b = torch.randn(1, generator=generator)
    labels = torch.rand(rows, generator=generator) < 0.15
    valid = torch.rand(rows, generator=generator) < valid_fraction

    def run(fn, *tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        logits, loss = fn(*leaves, labels, valid)
        return [logits.detach(), loss.detach(), *torch.autograd.grad(loss + logits.sum(), leaves)]

    def low_precision(x_, w_, b_, labels_, valid_):
        logits = F.gelu(x_) @ w_.to(x_.dtype) + b_.to(x_.dtype)
        per_row = F.binary_cross_entropy_with_logits(logits, labels_.to(x_.dtype), reduction="none")
        mask = valid_.to(x_.dtype)
        return logits, (per_row * mask).sum() / mask.sum().clamp_min(1)

    actual = run(lambda *a: disc_head(*a, backend=PATHS[path]), x, w, b)
    expected = run(disc_head_reference, x.double(), w.double(), b.double())
    pytorch = run(low_precision, x, w, b)
    check_outputs(("logits", "loss", "dx", "dw", "db"), actual, expected, pytorch, dtype)


# --- attention ---

ATTENTION_DTYPES = {"cpu": [torch.float32, torch.bfloat16], "emulated": [torch.bfloat16, torch.float16]}
# The CUDA kernels take head dims 32, 64 and 128. The CPU kernel takes any head dim, and in float32 it is
# checked on any. In 16 bits only on the CUDA kernels' dims: every kernel here (and FlashAttention, and
# PyTorch's own flash kernels) computes the backward's row term delta = rowsum(dO * O) from the rounded 16-bit
# output, whose rounding error is not averaged away when D is small; against PyTorch's math path in bfloat16
# (which differentiates the softmax directly) the CPU kernel's dq/dk error measured up to 3.4x at D = 1, 1.6x at
# D = 4, 1.4x at D = 8 and <= 1x from D = 16 on (60 random shapes each, T < 40).
HEAD_DIMS = {("cpu", torch.float32): st.integers(1, 80), ("cpu", torch.bfloat16): st.sampled_from([32, 64]),
             ("emulated", torch.bfloat16): st.sampled_from([32, 64, 128]),
             ("emulated", torch.float16): st.sampled_from([32, 64, 128])}


def masked_low_precision_attention(q, k, v, seqlens, scale):
    """PyTorch's own attention math in q's dtype, [B, T, H, D], padded keys ignored and padded rows zero."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    valid = torch.arange(q.shape[1]) < seqlens.unsqueeze(1)
    scores = (qh @ kh.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probabilities = torch.softmax(scores, dim=-1).nan_to_num(0.0).masked_fill(~valid[:, None, :, None], 0.0)
    return (probabilities @ vh).transpose(1, 2)


@pytest.mark.parametrize("path", PATHS)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_attention_matches_reference(path, data):
    batch = data.draw(st.integers(1, 3), label="batch")
    seq_len = data.draw(st.integers(1, 40), label="seq_len")
    heads = data.draw(st.integers(1, 3), label="heads")
    dtype = data.draw(st.sampled_from(ATTENTION_DTYPES[path]), label="dtype")
    head_dim = data.draw(HEAD_DIMS[path, dtype], label="head_dim")
    fused = data.draw(st.booleans(), label="fused_qkv")
    lengths = data.draw(st.lists(st.integers(0, seq_len), min_size=batch, max_size=batch), label="seqlens")
    # Dropout against the reference needs no low-precision baseline: float32 only.
    dropout_p = data.draw(st.sampled_from([0.0, 0.2]), label="dropout_p") if dtype == torch.float32 else 0.0
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    qkv = torch.randn(batch, seq_len, 3, heads, head_dim, generator=generator).to(dtype)
    q, k, v = qkv.unbind(2) if fused else (t.contiguous() for t in qkv.unbind(2))
    grad_out = torch.randn(q.shape, generator=generator).to(dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    scale = head_dim**-0.5

    def run(fn, *tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = fn(*leaves)
        return [out.detach(), *torch.autograd.grad(out, leaves, grad_out.to(out.dtype))]

    def seeded(backend):
        return lambda *qkv_: attention(*qkv_, seqlens=seqlens, dropout_p=dropout_p, backend=backend,
                                       generator=torch.Generator().manual_seed(3))

    actual = run(seeded(PATHS[path]), q, k, v)
    expected = run(seeded("reference"), q.double(), k.double(), v.double())
    pytorch = run(lambda *qkv_: masked_low_precision_attention(*qkv_, seqlens, scale), q, k, v) \
        if dtype != torch.float32 else expected
    check_outputs(("out", "dq", "dk", "dv"), actual, expected, pytorch, dtype)
    # Padded query rows are zero in the output and in dq.
    padding = torch.arange(seq_len) >= seqlens.unsqueeze(1)
    assert not actual[0][padding].any() and not actual[1][padding].any()


# --- gen_head ---

GEN_HEAD_DTYPES = {"cpu": [torch.float32, torch.bfloat16, torch.float16], "emulated": [torch.bfloat16, torch.float16]}


@pytest.mark.parametrize("path", PATHS)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_gen_head_matches_reference(path, data):
    rows = data.draw(st.integers(0, 40), label="rows")
    vocab = data.draw(st.integers(2, 300), label="vocab")
    hidden = data.draw(st.integers(1, 48), label="hidden")
    dtype = data.draw(st.sampled_from(GEN_HEAD_DTYPES[path]), label="dtype")
    temperature = data.draw(st.sampled_from([0.5, 1.0, 2.0]), label="temperature")
    disallow_correct = data.draw(st.booleans(), label="disallow_correct")
    ignored_fraction = data.draw(st.sampled_from([0.0, 0.3, 1.0]), label="ignored_fraction")
    contiguous = data.draw(st.booleans(), label="contiguous")
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), label="seed"))
    h = strided(torch.randn(rows, hidden, generator=generator).to(dtype), generator, contiguous)
    weight = (2.0 / hidden**0.5 * torch.randn(vocab, hidden, generator=generator)).to(dtype)
    bias = (0.1 * torch.randn(vocab, generator=generator)).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[torch.rand(rows, generator=generator) < ignored_fraction] = -100

    def run(fn, *tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = fn(*leaves)
        return out, [out.loss.detach(), out.lse.detach(), *torch.autograd.grad(out.loss, leaves)]

    def head(backend):
        return lambda *leaves: gen_head(*leaves, targets, temperature=temperature, disallow_correct=disallow_correct,
                                        generator=torch.Generator().manual_seed(5), backend=backend)

    def low_precision(h_, weight_, bias_):
        logits = F.linear(h_, weight_, bias_)
        counted = targets != -100
        loss = F.cross_entropy(logits, targets) if counted.any() else logits.sum() * 0
        return type("Out", (), dict(loss=loss, lse=torch.logsumexp(logits, -1)))

    out, actual = run(head(PATHS[path]), h, weight, bias)
    reference_out, expected = run(head("reference"), h.double(), weight.double(), bias.double())
    _, pytorch = run(low_precision, h, weight, bias)
    check_outputs(("loss", "lse", "dh", "dweight", "dbias"), actual, expected, pytorch, dtype)
    assert out.samples.shape == (rows,) and ((out.samples >= 0) & (out.samples < vocab)).all()
    if disallow_correct:
        counted = targets != -100
        assert not (out.samples[counted] == targets[counted]).any()
