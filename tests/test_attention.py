"""electra_ext.ops.attention and attention_varlen against the float64 reference on every target (CPU kernel,
emulated CUDA kernels, CUDA kernels): padding, lengths that straddle the kernels' tiles, strided inputs, the
packed layout, Philox dropout (the same mask everywhere, forward and backward), opcheck, torch.compile and
input checks."""
import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F

from electra_ext.ops import attention, attention_qkvpacked, attention_varlen
from electra_ext.ops.reference import (attention_dropout_draws, attention_dropout_keep, dropout_scale,
                                       dropout_threshold, philox4x32_10)
from op_testing import KernelsRan, TARGETS, relative_error, run_on_baseline_cpu_build, run_with_cpu_isa

OP = torch.ops.electra_ext.attention.default
BACKWARD_OP = torch.ops.electra_ext.attention_backward.default

# Sequence lengths around the kernels' 64-row tiles and ELECTRA's 128 and 512 (200 is 4 key tiles, one more than
# the wgmma forward's ring of K and V buffers).
LENGTHS = [1, 17, 64, 65, 127, 128, 129, 200, 511, 512, 513, 2048]
DTYPES = {"cpu": [torch.float32, torch.bfloat16], "emulated": [torch.bfloat16, torch.float16],
          "cuda": [torch.bfloat16, torch.float16]}


@contextlib.contextmanager
def deterministic_algorithms(enabled):
    """torch.use_deterministic_algorithms(enabled) for the block: on, the attention backward takes the dQ kernel
    that recomputes S and dP instead of the dK/dV kernel's dQ sums."""
    was_on = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_on)


@pytest.fixture
def op(backend):
    """attention as the target runs it."""
    return functools.partial(attention, backend=backend)


@pytest.fixture
def bitwise_backward(target):
    """On a GPU the default backward adds dQ over key blocks with atomics, in whatever order the blocks run, so
    tests that compare gradients bit for bit ask PyTorch for deterministic algorithms there (the dQ kernel that
    recomputes S and dP instead). The emulation runs blocks one after another and compares the default path."""
    with deterministic_algorithms(torch.are_deterministic_algorithms_enabled() or target == "cuda"):
        yield


def make_qkv(batch, seq_len, heads, head_dim, device, dtype, seed=0, fused=True):
    """q, k, v [B, T, H, D]; fused: strided views of one [B, T, 3, H, D] projection, as the encoder passes."""
    generator = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, seq_len, 3, heads, head_dim, generator=generator).to(device=device, dtype=dtype)
    if fused:
        return qkv.unbind(2)
    return tuple(t.contiguous() for t in qkv.unbind(2))


def lengths_for(batch, seq_len):
    """Full, about half, one token and, from four sequences on, an all-padding one."""
    lengths = [seq_len, (seq_len + 1) // 2, 1, 0][:batch]
    return torch.tensor(lengths, dtype=torch.int32)


def far_below_zero(head_dim):
    """check_against_float64's score_offset that puts every score near -128 at this head dim."""
    return 4 * (64 / head_dim) ** 0.25


def forward_backward(fn, q, k, v, grad_out):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    return (out.detach(),) + torch.autograd.grad(out, (q, k, v), grad_out)


def low_precision_attention(q, k, v, seqlens, softmax_scale):
    """PyTorch's own attention math in q's dtype (the baseline of the FlashAttention error rule)."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    valid = torch.arange(q.shape[1], device=q.device) < seqlens.to(q.device).unsqueeze(1)
    scores = (qh @ kh.transpose(-1, -2)) * softmax_scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probabilities = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    probabilities = probabilities.masked_fill(~valid[:, None, :, None], 0.0)
    return (probabilities @ vh).transpose(1, 2)


def check_against_float64(device, op, dtype, batch, seq_len, heads, head_dim, dropout_p=0.0, softmax_scale=None,
                          score_offset=0.0):
    """score_offset c > 0: q = c + noise / 4 and k = -c + noise / 4, so every score is about -c^2 D scale (a
    row's log-sum-exp far below zero) with a spread of a few units."""
    q, k, v = make_qkv(batch, seq_len, heads, head_dim, device, dtype, seed=seq_len)
    if score_offset:
        q, k = ((t.float() / 4 + sign * score_offset).to(dtype) for t, sign in ((q, 1), (k, -1)))
    seqlens = lengths_for(batch, seq_len).to(device)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale

    def seeded(fn):
        return lambda a, b, c: fn(a, b, c, seqlens=seqlens, dropout_p=dropout_p, softmax_scale=softmax_scale,
                                  generator=torch.Generator(device).manual_seed(7))

    expected = forward_backward(seeded(functools.partial(attention, backend="reference")),
                                *(t.double() for t in (q, k, v, grad_out)))
    with KernelsRan("attention", "attention_backward"):
        actual = forward_backward(seeded(op), q, k, v, grad_out)
    for name, a in zip(("out", "dq", "dk", "dv"), actual):
        assert a.dtype == dtype and a.shape == q.shape, name
    if dtype == torch.float32 and not score_offset:
        for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
            assert relative_error(a, e) <= 1e-5, name
        return
    # FlashAttention's rule: against the float64 reference on the same (rounded) inputs, the kernel's error is at
    # most twice that of PyTorch's own attention in the same precision (dropout off: the baseline has none).
    assert dropout_p == 0.0
    pytorch = forward_backward(lambda a, b, c: low_precision_attention(a, b, c, seqlens, scale), q, k, v, grad_out)
    for name, a, p, e in zip(("out", "dq", "dk", "dv"), actual, pytorch, expected):
        kernel_error = (a.double().cpu() - e.cpu()).abs().max().item()
        pytorch_error = (p.double().cpu() - e.cpu()).abs().max().item()
        # A floor far below the dtype's resolution: with one key (T = 1) PyTorch's dq and dk are exactly 0, while
        # the kernels' delta (rowsum(dO * out), summed in another order than dO . v) leaves ~1e-6.
        floor = 1e-5 * max(1.0, e.abs().max().item())
        assert kernel_error <= 2 * pytorch_error + floor, f"{name}: {kernel_error} vs PyTorch {pytorch_error}"


@pytest.mark.parametrize("seq_len", LENGTHS)
def test_matches_float64_reference_across_lengths(target, device, op, seq_len):
    batch, heads = (1, 1) if seq_len > 1024 else (4, 2)
    for dtype in DTYPES[target]:
        check_against_float64(device, op, dtype, batch, seq_len, heads, 64)


@pytest.mark.parametrize("seq_len", [1, 129, 513])
def test_cpu_kernel_in_float16(seq_len):
    # The CPU kernel takes float16 too (converted to float32 per block, as bfloat16 is), outside issue 6's dtypes.
    check_against_float64("cpu", attention, torch.float16, 3, seq_len, 2, 64)


@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_head_dims(target, device, op, head_dim):
    for dtype in DTYPES[target]:
        check_against_float64(device, op, dtype, 3, 65, 2, head_dim)


@pytest.mark.parametrize("softmax_scale", [0.3, 1.0])
def test_softmax_scale_forward_and_backward(target, device, op, softmax_scale):
    """Every other backward test runs the default 1 / sqrt(D)."""
    for dtype in DTYPES[target]:
        check_against_float64(device, op, dtype, 3, 65, 2, 64, softmax_scale=softmax_scale)


@pytest.mark.parametrize("head_dim", [32, 64])
def test_rows_whose_scores_are_all_far_below_zero(target, device, op, head_dim):
    """Scores about -128 (beyond float32's exp range, -87) with a last key block one key short (T = 63): the
    kernels' running max and log-sum-exp keep the softmax finite, and the key masks keep the zero-filled key past
    the sequence (score 0, far above the real ones) out of forward and backward. The float32 path is held to the
    2x rule here too: at these magnitudes any float32 attention, PyTorch's included, is off by more than 1e-5."""
    for dtype in DTYPES[target]:
        check_against_float64(device, op, dtype, 2, 63, 2, head_dim, score_offset=far_below_zero(head_dim))


@pytest.mark.parametrize("target", [target for target in TARGETS if target != "cpu"])
def test_mma_sync_kernels_where_wgmma_would_run(monkeypatch, target, device, op):
    """ELECTRA_EXT_WGMMA="0" keeps an sm_90 on the mma.sync kernels (the A100's) where it would take the wgmma
    forward (head dims 64 and 128) and dK/dV kernel (64). The emulated device is an sm_90, so every other emulated
    test runs the wgmma kernels; on a GPU those run only on compute capability 9.0 in a build with sm_90a code, so
    elsewhere this repeats the default. Forward and backward against the float64 reference, and dropout's mask in
    both. Which kernels each setting takes (ELECTRA_EXT_EMULATED_SM="80" too) is checked by
    tests/native/test_attention_emulated.cpp."""
    monkeypatch.setenv("ELECTRA_EXT_WGMMA", "0")
    # 63: a last key block one key short (the forward's key mask at its edge).
    for head_dim, seq_len in [(64, 17), (64, 63), (64, 130), (128, 65)]:
        check_against_float64(device, op, DTYPES[target][0], 3, seq_len, 2, head_dim)
    check_against_float64(device, op, DTYPES[target][0], 3, 65, 2, 64, softmax_scale=0.3)
    check_against_float64(device, op, DTYPES[target][1], 2, 63, 2, 64, score_offset=far_below_zero(64))
    test_dropout_mask_is_the_philox_contract_and_keeps_one_minus_p(target, device, op, 0.1)
    for head_dim in (64, 128):
        test_dropout_matches_reference_with_the_same_seed(device, op, target, head_dim)


@pytest.mark.parametrize("deterministic", [False, True], ids=["dq-atomics", "dq-kernel"])
def test_the_kernels_fit_a_consumer_gpu(monkeypatch, deterministic):
    """ELECTRA_EXT_EMULATED_SM="86": an RTX 3090's limits (99 KiB of shared memory per block, which the RTX 40xx,
    L4 and RTX 50xx share; the A100 has 163, the H100 227), where a kernel that asks for more fails to launch.
    Every head dim, forward and backward, with the dQ kernel too, against the float64 reference."""
    monkeypatch.setenv("ELECTRA_EXT_EMULATED_SM", "86")
    with deterministic_algorithms(deterministic):
        for head_dim in (32, 64, 128):
            check_against_float64("cpu", functools.partial(attention, backend="emulated"), torch.bfloat16, 2, 70, 2,
                                  head_dim)


@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_dropout_matches_reference_with_the_same_seed(device, op, target, head_dim):
    # The float32 CPU kernel against the float64 reference with dropout; then every target's kernels in bfloat16
    # against the float32 reference with the same seed (the same Philox masks and 1 / (1 - p) scale). Each head
    # dim has its own tiles (the mma.sync dK/dV kernel's query tile: 64 rows at D = 32, 32 above).
    if target == "cpu":
        check_against_float64(device, op, torch.float32, 4, 130, 2, head_dim, dropout_p=0.1)
    dtype = torch.bfloat16
    q, k, v = make_qkv(3, 65, 2, head_dim, device, dtype, seed=3)
    seqlens = lengths_for(3, 65).to(device)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    seeded = lambda fn: (lambda a, b, c: fn(a, b, c, seqlens=seqlens, dropout_p=0.1,  # noqa: E731
                                            generator=torch.Generator(device).manual_seed(7)))
    expected = forward_backward(seeded(functools.partial(attention, backend="reference")),
                                *(t.float() for t in (q, k, v, grad_out)))
    with KernelsRan("attention", "attention_backward"):
        actual = forward_backward(seeded(op), q, k, v, grad_out)
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        assert relative_error(a, e) <= 2e-2, name


def extracted_dropout_mask(op, device, dtype, batch, heads, seq_len, seqlens, dropout_p, seed):
    """With q = k = 0 every kept probability is 1 / (len (1 - p)); with v_j = e_j, out[b, i, h, j] is non-zero
    exactly where entry (b, h, i, j) was kept. Returns that mask [B, H, T, T] (head_dim = T)."""
    q = torch.zeros(batch, seq_len, heads, seq_len, device=device, dtype=dtype)
    v = torch.eye(seq_len, device=device, dtype=dtype).expand(batch, heads, seq_len, seq_len).transpose(1, 2)
    out = op(q, q, v.contiguous(), seqlens=seqlens, dropout_p=dropout_p,
             generator=torch.Generator(device).manual_seed(seed))
    return (out != 0).transpose(1, 2).cpu()


def philox_seed(device, seed):
    """The seed attention draws from a generator seeded with `seed`."""
    return torch.randint(-2**63, 2**63 - 1, (1,), dtype=torch.int64, device=device,
                         generator=torch.Generator(device).manual_seed(seed))


@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_dropout_mask_is_the_philox_contract_and_keeps_one_minus_p(target, device, op, dropout_p):
    batch, heads, seq_len = 2, 2, 64  # head_dim = seq_len = 64, one the CUDA kernels take
    seqlens = torch.tensor([64, 50], dtype=torch.int32, device=device)
    dtype = DTYPES[target][-1]
    kept = extracted_dropout_mask(op, device, dtype, batch, heads, seq_len, seqlens, dropout_p, seed=11)
    contract = attention_dropout_keep(philox_seed(device, 11), batch, heads, seq_len, dropout_p, "cpu")
    valid = torch.arange(seq_len) < seqlens.cpu().unsqueeze(1)
    region = (valid[:, None, :, None] & valid[:, None, None, :]).expand_as(kept)
    assert torch.equal(kept & region, contract & region)
    assert abs(kept[region].float().mean().item() - (1 - dropout_p)) <= 0.01
    again = extracted_dropout_mask(op, device, dtype, batch, heads, seq_len, seqlens, dropout_p, seed=11)
    other = extracted_dropout_mask(op, device, dtype, batch, heads, seq_len, seqlens, dropout_p, seed=12)
    assert torch.equal(kept, again) and not torch.equal(kept & region, other & region)


def test_dropout_draws_are_uniform_bytes_and_the_scale_unbiased():
    # The contract itself, over 2^20 entries of one seed. The bytes are uniform on 0..255 (chi-square, 255
    # degrees of freedom: 330.5 is the 0.999 quantile), so dropout keeps 1 - round(256 p) / 256 of the entries,
    # p rounded by at most 1/512, and the kept ones scaled by 256 / (256 - round(256 p)) average to 1.
    seed = torch.tensor([123456789], dtype=torch.int64)
    draws = attention_dropout_draws(seed, 4, 4, 256, "cpu")
    entries = draws.numel()
    counts = torch.bincount(draws.flatten().long(), minlength=256).double()
    expected = entries / 256
    chi_square = ((counts - expected) ** 2 / expected).sum().item()
    assert chi_square < 330.5, chi_square
    for dropout_p in (1 / 512, 0.01, 0.1, 0.3, 0.9, 0.998):
        threshold = dropout_threshold(dropout_p)
        assert abs(threshold / 256 - dropout_p) <= 1 / 512, dropout_p
        keep = attention_dropout_keep(seed, 4, 4, 256, dropout_p, "cpu").double()
        keep_probability = 1 - threshold / 256
        bound = 6 * (keep_probability * (1 - keep_probability) / entries) ** 0.5  # 6 sigma of a proportion
        assert abs(keep.mean().item() - keep_probability) <= bound, dropout_p
        assert abs((keep * dropout_scale(dropout_p)).mean().item() - 1) <= bound / keep_probability, dropout_p


def test_philox_known_answers():
    # Random123's known-answer vectors for Philox4x32-10 (kat_vectors): counter, key -> output.
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, expected in cases:
        words = philox4x32_10(*(torch.tensor(c, dtype=torch.int64) for c in counter + key))
        assert tuple(int(w) for w in words) == expected


def test_varlen_equals_padded(target, device, backend, bitwise_backward):
    batch, seq_len, heads, head_dim = 3, 70, 2, 64
    dtype = DTYPES[target][-1]
    q, k, v = make_qkv(batch, seq_len, heads, head_dim, device, dtype, seed=5)
    seqlens = torch.tensor([70, 33, 1], dtype=torch.int32, device=device)
    valid = torch.arange(seq_len, device=device) < seqlens.unsqueeze(1)
    cu_seqlens = F.pad(seqlens.cumsum(0), (1, 0)).to(torch.int32)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    grad_out = grad_out * valid[:, :, None, None]
    for dropout_p in (0.0, 0.2):
        def padded(a, b, c):
            return attention(a, b, c, seqlens=seqlens, dropout_p=dropout_p, backend=backend,
                             generator=torch.Generator(device).manual_seed(3))

        def packed(a, b, c):
            return attention_varlen(a, b, c, cu_seqlens, seq_len, dropout_p=dropout_p, backend=backend,
                                    generator=torch.Generator(device).manual_seed(3))

        expected = forward_backward(padded, q, k, v, grad_out)
        actual = forward_backward(packed, q[valid], k[valid], v[valid], grad_out[valid])
        for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
            assert torch.equal(a, e[valid]), (name, dropout_p)


def test_qkvpacked_equals_attention_on_the_unbound_views(target, device, backend, bitwise_backward):
    # The encoder's path: one [B, T, 3, H, D] projection output in, its gradient out as one tensor, bit for bit what
    # attention on the three views computes, and with no stack of three gradients in the graph.
    dtype = DTYPES[target][-1]
    qkv = torch.randn(3, 70, 3, 2, 64, generator=torch.Generator().manual_seed(4)).to(device=device, dtype=dtype)
    seqlens = torch.tensor([70, 33, 0], dtype=torch.int32, device=device)
    grad_out = torch.randn(3, 70, 2, 64, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    for dropout_p in (0.0, 0.2):
        options = {"seqlens": seqlens, "dropout_p": dropout_p, "backend": backend}
        packed_input = qkv.detach().clone().requires_grad_()
        packed = attention_qkvpacked(packed_input, generator=torch.Generator(device).manual_seed(3), **options)
        assert "Unbind" not in type(packed.grad_fn.next_functions[0][0]).__name__
        (packed_grad,) = torch.autograd.grad(packed, packed_input, grad_out)
        views_input = qkv.detach().clone().requires_grad_()
        views = attention(*views_input.unbind(2), generator=torch.Generator(device).manual_seed(3), **options)
        (views_grad,) = torch.autograd.grad(views, views_input, grad_out)
        assert torch.equal(packed, views) and torch.equal(packed_grad, views_grad), dropout_p


def test_varlen_reference_equals_padded_reference():
    q, k, v = make_qkv(3, 20, 2, 16, "cpu", torch.float64, seed=9)
    seqlens = torch.tensor([20, 7, 0], dtype=torch.int32)
    valid = torch.arange(20) < seqlens.unsqueeze(1)
    cu_seqlens = F.pad(seqlens.cumsum(0), (1, 0)).to(torch.int32)
    for dropout_p in (0.0, 0.3):
        padded = attention(q, k, v, seqlens=seqlens, dropout_p=dropout_p, generator=torch.Generator().manual_seed(0))
        packed = attention_varlen(q[valid], k[valid], v[valid], cu_seqlens, 20, dropout_p=dropout_p,
                                  generator=torch.Generator().manual_seed(0))
        assert torch.allclose(packed, padded[valid], atol=1e-12)


@pytest.mark.parametrize("reference_dtype", [False, True])
def test_varlen_without_tokens(target, device, backend, reference_dtype):
    # Every sequence empty: [0, H, D] in, [0, H, D] out and empty gradients, on the kernels and on the reference
    # (float64 always runs it), which gathered padding positions from token 0 and raised IndexError.
    dtype = torch.float64 if reference_dtype else DTYPES[target][-1]
    q, k, v = (torch.zeros(0, 2, 64, device=device, dtype=dtype) for _ in range(3))
    cu_seqlens = torch.zeros(3, dtype=torch.int32, device=device)
    for dropout_p in (0.0, 0.2):
        def packed(a, b, c):
            return attention_varlen(a, b, c, cu_seqlens, 5, dropout_p=dropout_p,
                                    backend=None if reference_dtype else backend)

        for result in forward_backward(packed, q, k, v, torch.zeros_like(q)):
            assert result.shape == q.shape and result.dtype == dtype


def test_padded_rows_are_zero_and_padding_is_ignored(target, device, op):
    dtype = DTYPES[target][0]
    q, k, v = make_qkv(4, 40, 2, 64, device, dtype, seed=4)
    seqlens = lengths_for(4, 40).to(device)
    out = op(q, k, v, seqlens=seqlens)
    garbage = [t.clone() for t in (q, k, v)]
    for t in garbage:
        t[1, 20:] = 1e4  # padding of sequence 1 (length 20)
    assert torch.equal(op(*garbage, seqlens=seqlens)[:, :20], out[:, :20])
    for row, length in enumerate(seqlens.tolist()):
        assert out[row, length:].abs().sum().item() == 0


def test_no_seqlens_means_no_padding(target, device, op):
    dtype = DTYPES[target][0]
    q, k, v = make_qkv(2, 33, 2, 64, device, dtype, seed=6)
    full = torch.full((2,), 33, dtype=torch.int32, device=device)
    assert torch.equal(op(q, k, v), op(q, k, v, seqlens=full))
    assert torch.equal(op(q, k, v, softmax_scale=0.5), op(q, k, v, seqlens=full, softmax_scale=0.5))


def test_broadcast_keys_and_values(target, device, op):
    """k and v expanded along the tokens (token stride 0; one sequence, so the op's [tokens, H, D] view keeps it):
    every query attends to one repeated key and value. A token stride below head_dim is no BLAS leading dimension,
    so the CPU kernel must copy such rows."""
    dtype = DTYPES[target][0]
    q, k, v = make_qkv(1, 300, 2, 64, device, dtype, seed=12)
    k, v = (t[:, :1].expand_as(q) for t in (k, v))
    seqlens = lengths_for(1, 300).to(device)
    expected = attention(*(t.double() for t in (q, k, v)), seqlens=seqlens, backend="reference")
    assert relative_error(op(q, k, v, seqlens=seqlens), expected) <= (1e-5 if dtype == torch.float32 else 1e-2)


def test_contiguous_inputs_at_an_unaligned_offset(target, device, op, bitwise_backward):
    """q, k, v and grad_out contiguous but starting 3 elements into their storage: the CUDA kernels' 16-byte loads
    need aligned copies, which .contiguous() does not make (it returned them as they were, and the launch failed
    with an invalid-argument error)."""
    dtype = DTYPES[target][-1]
    q, k, v = make_qkv(2, 40, 2, 64, device, dtype, seed=13)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)

    def unaligned(t):
        storage = torch.empty(t.numel() + 3, device=device, dtype=dtype)
        storage[3:] = t.reshape(-1)
        return storage[3:].view(t.shape)

    expected = forward_backward(op, q, k, v, grad_out)
    leaves = [unaligned(t).requires_grad_() for t in (q, k, v)]
    assert all(t.is_contiguous() and t.data_ptr() % 16 for t in leaves)
    out = op(*leaves)
    actual = (out.detach(),) + torch.autograd.grad(out, leaves, unaligned(grad_out))
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        assert torch.equal(a, e), name


def test_bitwise_deterministic(target, device, op, bitwise_backward):
    dtype = DTYPES[target][0]
    q, k, v = make_qkv(2, 130, 2, 64, device, dtype, seed=8)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    run = lambda: forward_backward(lambda a, b, c: op(a, b, c, dropout_p=0.1,  # noqa: E731
                                                      generator=torch.Generator(device).manual_seed(1)),
                                   q, k, v, grad_out)
    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("target", [t for t in TARGETS if t != "cpu"])
def test_deterministic_algorithms_take_the_dq_kernel(target, device, op):
    # Default: the dK/dV kernel also adds each key block's part of dQ to a float32 workspace (atomics on a GPU).
    # torch.use_deterministic_algorithms(True): the dQ kernel recomputes S and dP and sums over keys in one fixed
    # order. The two differ only in dQ's summation order.
    dtype = DTYPES[target][0]
    seq_len = 130  # three 64-key blocks
    q, k, v = make_qkv(2, seq_len, 2, 64, device, dtype, seed=14)
    seqlens = torch.tensor([seq_len, seq_len // 2 + 1], dtype=torch.int32, device=device)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(device=device, dtype=dtype)
    run = lambda: forward_backward(lambda a, b, c: op(a, b, c, seqlens=seqlens, dropout_p=0.1,  # noqa: E731
                                                      generator=torch.Generator(device).manual_seed(2)),
                                   q, k, v, grad_out)

    def kernels_of(step):
        """The CUDA kernels `step` launches (their names), or None off the GPU."""
        if target != "cuda":
            step()
            return None
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
            step()
            torch.cuda.synchronize()
        return " ".join(event.name for event in profiler.events())

    results = []
    default_kernels = kernels_of(lambda: results.append(run()))
    with deterministic_algorithms(True):
        deterministic_kernels = kernels_of(lambda: results.extend([run(), run()]))
    default, deterministic, again = results
    # On a Hopper build the default dK/dV kernel is the wgmma one, whose tensor cores sum in another order than
    # mma.sync's (the emulation sums both in one order, so it still compares them bit for bit).
    wgmma_backward = target == "cuda" and "attention_backward_hopper_device" in default_kernels
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), deterministic, again, default):
        assert torch.equal(a, b), name
        if name == "out" or (name != "dq" and not wgmma_backward):
            assert torch.equal(a, c), name
        # The float32 sums differ in order only: bfloat16 rounds them alike almost everywhere.
        assert relative_error(c, a) < 1e-2, name
    if target == "cuda":
        assert "dq_convert_kernel" in default_kernels and "dq_kernel" not in default_kernels
        assert "dq_kernel" in deterministic_kernels and "dq_convert_kernel" not in deterministic_kernels


@pytest.mark.parametrize("target", [t for t in TARGETS if t != "cpu"])
def test_the_dq_kernel_at_its_edges(target, device, op, backend):
    """The dQ kernel (deterministic algorithms) where the other tests take the dK/dV kernel's dQ: lengths one past
    its key tiles (65 and 33; 64 keys a tile up to D = 64, 32 at D = 128), every score far below zero with a
    zero-filled key past the sequence (T = 63), and packed sequences (their starts)."""
    with deterministic_algorithms(True):
        for head_dim in (32, 64, 128):
            check_against_float64(device, op, DTYPES[target][0], 2, 65, 2, head_dim)
        for head_dim in (32, 64):
            test_rows_whose_scores_are_all_far_below_zero(target, device, op, head_dim)
        test_varlen_equals_padded(target, device, backend, None)


def test_cpu_result_does_not_depend_on_thread_count():
    q, k, v = make_qkv(3, 200, 4, 64, "cpu", torch.float32, seed=10)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    seqlens = torch.tensor([200, 150, 3], dtype=torch.int32)
    run = lambda: forward_backward(lambda a, b, c: attention(a, b, c, seqlens=seqlens, dropout_p=0.1,  # noqa: E731
                                                             generator=torch.Generator().manual_seed(1)),
                                   q, k, v, grad_out)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
        torch.set_num_threads(max(2, threads))
        multi = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, multi):
        assert torch.equal(a, b)


BASELINE_PROBE = """
import torch
import test_attention as t
for seq_len in (1, 17, 129, 513):
    for dtype in t.DTYPES["cpu"]:
        t.check_against_float64("cpu", t.attention, dtype, 3, seq_len, 2, 64)
t.check_against_float64("cpu", t.attention, torch.float32, 3, 130, 2, 64, dropout_p=0.2)
t.check_against_float64("cpu", t.attention, torch.float32, 3, 65, 2, 32)
t.test_cpu_result_does_not_depend_on_thread_count()
"""


def test_cpu_baseline_build_matches_reference():
    # The CPU kernels are compiled twice, for AVX2 + FMA and for baseline x86-64 (CPUs without them).
    run_on_baseline_cpu_build(BASELINE_PROBE)


def test_a_misspelt_cpu_isa_is_an_error():
    """Not the AVX2 build in silence (the baseline tests would then test it twice)."""
    probe = "import torch, electra_ext; q = torch.randn(1, 5, 1, 64); electra_ext.ops.attention(q, q, q)"
    assert run_with_cpu_isa(probe, "auto").returncode == 0
    result = run_with_cpu_isa(probe, "basline")
    assert result.returncode != 0 and "ELECTRA_EXT_CPU_ISA must be baseline or auto, got 'basline'" in result.stderr


def packed_op_inputs(device, dtype, dropout_p):
    q, k, v = (t.reshape(-1, 2, 64).requires_grad_() for t in make_qkv(3, 21, 2, 64, device, dtype, fused=False))
    starts = torch.tensor([0, 21, 42], dtype=torch.int32, device=device)
    seqlens = torch.tensor([21, 9, 0], dtype=torch.int32, device=device)
    seed = torch.tensor([42], dtype=torch.int64, device=device) if dropout_p else None
    return (q, k, v, starts, seqlens, 21, dropout_p, 0.125, seed)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("layout", ["q, k, v", "qkv packed", "padded (starts None)", "no padding (seqlens None)",
                                    "padded [B, T, H, D]", "padded qkv packed [B, T, 3, H, D]"])
def test_opcheck(target, device, backend, dropout_p, layout):
    inputs = packed_op_inputs(device, DTYPES[target][0], dropout_p)
    batch, max_seqlen = inputs[4].shape[0], inputs[5]
    if "qkv packed" in layout:  # q = [tokens, 3, H, D], k = v = None
        inputs = (torch.stack(inputs[:3], dim=1).detach().requires_grad_(), None, None) + inputs[3:]
    if layout.startswith("padded"):  # the inputs' starts are b * max_seqlen already
        inputs = inputs[:3] + (None,) + inputs[4:]
    if "[B, T" in layout:  # q, k, v as the sequences [batch, max_seqlen, ...]
        inputs = tuple(t if t is None else t.detach().view(batch, max_seqlen, *t.shape[1:]).requires_grad_()
                       for t in inputs[:3]) + inputs[3:]
    if layout == "no padding (seqlens None)":  # every sequence max_seqlen tokens long
        inputs = inputs[:3] + (None, None) + inputs[5:]
    torch.library.opcheck(OP, inputs, {"emulated": backend == "emulated"})


@pytest.fixture
def uninitialised_memory_is_nan():
    """PyTorch's deterministic mode fills every new uninitialised tensor (at::empty) with NaN: an output row a
    kernel should write and does not then shows up."""
    with deterministic_algorithms(True):
        assert torch.utils.deterministic.fill_uninitialized_memory
        yield


LAYOUT_SEQ_LEN = 130  # a partial last block in every kernel; a forward block of padding rows from position 128


def layout_test_inputs(target, device):
    """q, k, v [3 x 130 tokens, 2, 64] and grad_out in the target's first dtype, for the layout tests."""
    dtype = DTYPES[target][0]
    q, k, v = (t.reshape(-1, 2, 64) for t in make_qkv(3, LAYOUT_SEQ_LEN, 2, 64, device, dtype, seed=12,
                                                      fused=False))
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
    return q, k, v, grad_out


def op_forward_backward(q, k, v, grad_out, options, backend):
    """The op's out and lse and its backward's packed gradient, for options = (starts, seqlens, max_seqlen,
    dropout_p, softmax_scale, seed)."""
    emulated = backend == "emulated"
    out, lse = OP(q, k, v, *options, emulated=emulated)
    return out, lse, BACKWARD_OP(grad_out, q, k, v, out, lse, *options, emulated=emulated)


def test_padded_layout_equals_explicit_starts_and_writes_every_row(target, device, backend,
                                                                   uninitialised_memory_is_nan):
    # starts None: outputs start uninitialised and every backend writes the padding rows as zeros. Lengths:
    # full, short (a forward block of padding rows only from position 128 on) and all padding.
    q, k, v, grad_out = layout_test_inputs(target, device)
    seq_len = LAYOUT_SEQ_LEN
    seqlens = torch.tensor([seq_len, 5, 0], dtype=torch.int32, device=device)
    starts = torch.arange(3, dtype=torch.int32, device=device) * seq_len
    seed = torch.tensor([7], dtype=torch.int64, device=device)
    explicit, padded = (op_forward_backward(q, k, v, grad_out, (sequence_starts, seqlens, seq_len, 0.2, 0.125, seed),
                                            backend) for sequence_starts in (starts, None))
    for a, b in zip(explicit, padded):
        assert torch.equal(a, b)
    out, lse, grad_qkv = padded
    for b, length in enumerate(seqlens.tolist()):
        padding = slice(b * seq_len + length, (b + 1) * seq_len)
        assert torch.count_nonzero(out[padding]) == 0 and torch.count_nonzero(lse[:, padding]) == 0
        assert torch.count_nonzero(grad_qkv[padding]) == 0


def test_no_padding_without_seqlens_equals_full_lengths(target, device, backend, uninitialised_memory_is_nan):
    # seqlens None (padded layout only): every sequence max_seqlen long, with no lengths tensor.
    q, k, v, grad_out = layout_test_inputs(target, device)
    full = torch.full((3,), LAYOUT_SEQ_LEN, dtype=torch.int32, device=device)
    seed = torch.tensor([11], dtype=torch.int64, device=device)
    full_lengths, without = (op_forward_backward(q, k, v, grad_out, (None, seqlens, LAYOUT_SEQ_LEN, 0.2, 0.125, seed),
                                                 backend) for seqlens in (full, None))
    for a, b in zip(full_lengths, without):
        assert torch.equal(a, b)


@pytest.mark.parametrize("packed", [False, True], ids=["q, k, v", "qkv packed"])
@pytest.mark.parametrize("lengths", ["seqlens", "no padding"])
def test_batch_layout_equals_token_layout(target, device, backend, packed, lengths, bitwise_backward):
    """The padded layout's q, k, v as [B, T, ...] (what the encoder has) against the same tokens as [B * T, ...]:
    the same bits out, in the caller's shape."""
    q, k, v, grad_out = layout_test_inputs(target, device)
    batch, seq_len = 3, LAYOUT_SEQ_LEN
    if packed:
        q, k, v = torch.stack((q, k, v), dim=1), None, None
    seqlens = torch.tensor([seq_len, 5, 0], dtype=torch.int32, device=device) if lengths == "seqlens" else None
    options = (None, seqlens, seq_len, 0.2, 0.125, torch.tensor([7], dtype=torch.int64, device=device))
    batch_inputs = (t if t is None else t.view(batch, seq_len, *t.shape[1:]) for t in (q, k, v))
    tokens = op_forward_backward(q, k, v, grad_out, options, backend)
    batched = op_forward_backward(*batch_inputs, grad_out.view(batch, seq_len, 2, 64), options, backend)
    for name, token_rows, batch_rows in zip(("out", "lse", "grad"), tokens, batched):
        expected_shape = token_rows.shape if name == "lse" else (batch, seq_len, *token_rows.shape[1:])
        assert batch_rows.shape == expected_shape, name
        assert torch.equal(batch_rows.reshape(token_rows.shape), token_rows), name


def test_torch_compile_fullgraph_no_graph_breaks(target, device, op, bitwise_backward):
    dtype = DTYPES[target][0]
    q, k, v = make_qkv(2, 65, 2, 64, device, dtype, seed=12)
    seqlens = torch.tensor([65, 30], dtype=torch.int32, device=device)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)

    def objective(a, b, c, dropout_p):
        return op(a, b, c, seqlens=seqlens, dropout_p=dropout_p)

    compiled = torch.compile(objective, fullgraph=True)
    eager = forward_backward(lambda a, b, c: objective(a, b, c, 0.0), q, k, v, grad_out)
    traced = forward_backward(lambda a, b, c: compiled(a, b, c, 0.0), q, k, v, grad_out)
    for a, b in zip(eager, traced):
        assert torch.equal(a, b)
    # With dropout the seed is a draw from torch's generator; fallback_random makes the compiled graph draw it
    # from eager's generator, so the same manual_seed gives the same mask.
    with torch._inductor.config.patch(fallback_random=True):
        torch.manual_seed(5)
        traced = forward_backward(lambda a, b, c: compiled(a, b, c, 0.1), q, k, v, grad_out)
    torch.manual_seed(5)
    eager = forward_backward(lambda a, b, c: objective(a, b, c, 0.1), q, k, v, grad_out)
    for a, b in zip(eager, traced):
        assert torch.equal(a, b)
    assert not torch.equal(eager[0], forward_backward(lambda a, b, c: objective(a, b, c, 0.0), q, k, v, grad_out)[0])


def test_float64_and_other_head_dims_run_the_reference():
    q, k, v = make_qkv(2, 19, 2, 24, "cpu", torch.float64, seed=13)
    expected = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert torch.allclose(attention(q, k, v), expected, atol=1e-12)


def test_reference_gradcheck():
    q, k, v = make_qkv(2, 5, 1, 4, "cpu", torch.float64, seed=14)
    seqlens = torch.tensor([5, 3])
    assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, seqlens=seqlens),
                                    tuple(t.detach().requires_grad_() for t in (q, k, v)))


BAD = [
    (lambda q: (q[0], q, q), {}, ValueError, "q must be \\[batch, seq, heads, head_dim\\]"),
    (lambda q: (q, q[:, :3], q), {}, ValueError, "k and v must have q's shape"),
    (lambda q: (q, q.double(), q), {}, TypeError, "share one floating dtype"),
    (lambda q: (q, q, q), {"seqlens": torch.tensor([1.0, 2.0])}, ValueError, "seqlens must be an int32/int64"),
    (lambda q: (q, q, q), {"seqlens": torch.tensor([1])}, ValueError,
     "seqlens must be an int32/int64 tensor of shape \\[2\\]"),
    (lambda q: (q, q, q), {"seqlens": torch.tensor([1, 6])}, ValueError, "seqlens must lie in \\[0, 5\\]"),
    (lambda q: (q, q, q), {"seqlens": torch.tensor([-1, 2])}, ValueError, "seqlens must lie in \\[0, 5\\]"),
    (lambda q: (q, q, q), {"dropout_p": 1.0}, ValueError, "dropout_p must be in \\[0, 1\\)"),
    (lambda q: (q, q, q), {"dropout_p": 0.001}, ValueError, "dropout_p must be 0 or in \\[1/512, 511/512\\)"),
    (lambda q: (q, q, q), {"dropout_p": 0.999}, ValueError, "dropout_p must be 0 or in \\[1/512, 511/512\\)"),
    (lambda q: (q, q, q), {"softmax_scale": -1.0}, ValueError, "softmax_scale must be a positive number"),
    (lambda q: (q, q, q), {"backend": "emulated"}, ValueError, "float16/bfloat16"),
    (lambda q: (q, q, q), {"backend": "gpu"}, ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("make,kwargs,error,message", BAD)
def test_bad_inputs_name_the_argument(make, kwargs, error, message):
    q = torch.randn(2, 5, 2, 8)
    with pytest.raises(error, match=message):
        attention(*make(q), **kwargs)


_SAMPLE = torch.randn(2, 5, 2, 8)
# The rows of BAD whose q, k, v are fine and whose options are not: the packed layout checks them the same way.
BAD_OPTIONS = [(kwargs, error, message) for make, kwargs, error, message in BAD
               if all(t is _SAMPLE for t in make(_SAMPLE))]


@pytest.mark.parametrize("kwargs,error,message", BAD_OPTIONS)
def test_bad_qkvpacked_options_name_the_argument(kwargs, error, message):
    with pytest.raises(error, match=message):
        attention_qkvpacked(torch.randn(2, 5, 3, 2, 8), **kwargs)


@pytest.mark.parametrize("qkv,error,message", [
    (torch.randn(2, 5, 2, 2, 8), ValueError, "qkv must be \\[batch, seq, 3, heads, head_dim\\]"),
    (torch.randn(2, 5, 3, 2), ValueError, "qkv must be \\[batch, seq, 3, heads, head_dim\\]"),
    (torch.ones(2, 5, 3, 2, 8, dtype=torch.int32), TypeError, "qkv must be a floating tensor, got torch.int32"),
    (torch.randn(2, 5, 3, 0, 8), ValueError, "qkv must have heads > 0 and head_dim > 0"),
    (torch.randn(2, 5, 3, 2, 0), ValueError, "qkv must have heads > 0 and head_dim > 0"),
])
def test_bad_qkvpacked_tensor_names_the_argument(qkv, error, message):
    with pytest.raises(error, match=message):
        attention_qkvpacked(qkv)


BAD_VARLEN = [
    ({"cu_seqlens": torch.tensor([0.0, 5.0])}, "cu_seqlens must be a 1-D int32/int64"),
    ({"cu_seqlens": torch.tensor([0, 4], dtype=torch.int32)}, "cu_seqlens must run from 0 to tokens = 5"),
    ({"cu_seqlens": torch.tensor([0, 4, 3, 5], dtype=torch.int32)}, "must lie in \\[0, 5\\]"),
    ({"max_seqlen": 2}, "must lie in \\[0, 2\\]"),
    ({"max_seqlen": -1}, "max_seqlen must be a non-negative int"),
]


@pytest.mark.parametrize("kwargs,message", BAD_VARLEN)
def test_bad_varlen_inputs_name_the_argument(kwargs, message):
    q = torch.randn(5, 2, 8)
    arguments = {"cu_seqlens": torch.tensor([0, 5], dtype=torch.int32), "max_seqlen": 5} | kwargs
    with pytest.raises(ValueError, match=message):
        attention_varlen(q, q, q, arguments["cu_seqlens"], arguments["max_seqlen"])


def test_op_checks_name_the_argument(target, device, backend):
    q, k, v, starts, seqlens, max_seqlen, _, scale, _ = packed_op_inputs(device, DTYPES[target][0], 0.0)
    emulated = {"emulated": backend == "emulated"}
    with pytest.raises(TypeError, match="starts must be an int32 tensor"):
        OP(q, k, v, starts.long(), seqlens, max_seqlen, 0.0, scale, None, **emulated)
    with pytest.raises(ValueError, match="dropout_p > 0 needs a seed tensor"):
        OP(q, k, v, starts, seqlens, max_seqlen, 0.1, scale, None, **emulated)
    with pytest.raises(ValueError, match="seed must be an int64 tensor with one element"):
        OP(q, k, v, starts, seqlens, max_seqlen, 0.1, scale, torch.zeros(2, dtype=torch.int64, device=device),
           **emulated)
    with pytest.raises(ValueError, match=r"with starts None \(the padded layout\), q must hold batch \* max_seqlen"):
        OP(q, k, v, None, seqlens, max_seqlen - 1, 0.0, scale, None, **emulated)
    with pytest.raises(ValueError, match=r"seqlens None \(no padding\) needs starts None"):
        OP(q, k, v, starts, None, max_seqlen, 0.0, scale, None, **emulated)
    with pytest.raises(ValueError, match="with starts and seqlens None, q must hold whole sequences of max_seqlen"):
        OP(q, k, v, None, None, max_seqlen - 1, 0.0, scale, None, **emulated)
    with pytest.raises(ValueError, match="k and v must both be tensors, or both None"):
        OP(q, k, None, starts, seqlens, max_seqlen, 0.0, scale, None, **emulated)
    with pytest.raises(ValueError, match="with k and v None, q must be \\[tokens, 3, heads, head_dim\\]"):
        OP(q, None, None, starts, seqlens, max_seqlen, 0.0, scale, None, **emulated)
    batch_q, batch_k, batch_v = (t.view(3, max_seqlen, 2, 64) for t in (q, k, v))
    with pytest.raises(ValueError, match="q as \\[batch, max_seqlen, ...\\] is the padded layout: starts must be None"):
        OP(batch_q, batch_k, batch_v, starts, seqlens, max_seqlen, 0.0, scale, None, **emulated)
    with pytest.raises(ValueError, match=f"q as \\[batch, max_seqlen, ...\\] needs max_seqlen = {max_seqlen}, got 7"):
        OP(batch_q, batch_k, batch_v, None, seqlens, 7, 0.0, scale, None, **emulated)
    with pytest.raises(ValueError, match="k and v must have q's shape"):
        OP(batch_q, batch_k[:2], batch_v[:2], None, seqlens, max_seqlen, 0.0, scale, None, **emulated)
    with pytest.raises(ValueError, match="seqlens must have one entry per sequence of q \\(3\\), got 2"):
        OP(batch_q, batch_k, batch_v, None, seqlens[:2], max_seqlen, 0.0, scale, None, **emulated)
    seed = torch.zeros(1, dtype=torch.int64, device=device)
    for dropout_p in (0.0019, 0.999):  # below 1/512 and from 511/512 on: no dropout, or all dropped, at 1/256
        with pytest.raises(ValueError, match="dropout_p must be 0 or in \\[1/512, 511/512\\)"):
            OP(q, k, v, starts, seqlens, max_seqlen, dropout_p, scale, seed, **emulated)
    out, lse = OP(q, k, v, starts, seqlens, max_seqlen, 0.0, scale, None, **emulated)
    with pytest.raises(ValueError, match="lse must be float32 \\[heads, tokens\\]"):
        BACKWARD_OP(out, q, k, v, out, lse.t(), starts, seqlens, max_seqlen, 0.0, scale, None, **emulated)
    if device == "cpu":  # the CPU kernel and the emulated CUDA kernels read the lengths; the CUDA ones clamp them
        with pytest.raises(ValueError, match=f"seqlens\\[0\\] = {max_seqlen + 1} is outside \\[0, max_seqlen"):
            OP(q, k, v, starts, seqlens + 1, max_seqlen, 0.0, scale, None, **emulated)
        with pytest.raises(ValueError, match="sequence 0 .* is outside the"):
            OP(q, k, v, starts + q.shape[0], seqlens, max_seqlen, 0.0, scale, None, **emulated)
