"""ops.gen_head on the CPU kernel, the reference and the CUDA kernels (on a GPU, and emulated on the CPU): loss,
log-sum-exp and gradients against float64 PyTorch (F.linear + cross-entropy), ignored rows, M = 0, the Gumbel-max
sampler against the softmax (chi-square), the Philox noise contract, temperature, disallow_correct,
kernel/reference/thread-count agreement, chunked backward, opcheck, torch.compile and input checks."""
import pytest
import torch
import torch.nn.functional as F

from electra_ext.ops import gen_head, has_kernel
from electra_ext.ops.reference import GEN_HEAD_STREAM, philox4x32_10

from op_testing import KernelsRan, REQUIRES_CUDA, TARGETS, relative_error, run_on_baseline_cpu_build

OP = torch.ops.electra_ext.gen_head.default
V, E = 1000, 32  # V is no multiple of a power-of-two tile

# "kernel": the default dispatch, the CPU kernel for float32/bfloat16/float16; "reference": the PyTorch reference.
PROVIDERS = {"kernel": None, "reference": "reference"}


@pytest.fixture(params=PROVIDERS)
def provider(request):
    return PROVIDERS[request.param]


def test_cpu_kernel_is_registered():
    assert has_kernel(OP, "cpu")


def inputs(rows, seed=0, dtype=torch.float32, vocab=V, hidden=E):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=generator, dtype=dtype, requires_grad=True)
    weight = (3.0 / hidden**0.5 * torch.randn(vocab, hidden, generator=generator, dtype=dtype)).requires_grad_()
    bias = (0.1 * torch.randn(vocab, generator=generator, dtype=dtype)).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    return h, weight, bias, targets


def float64_expected(h, weight, bias, targets, ignore_index=-100):
    """loss, lse, num_correct and the three gradients in float64 from PyTorch's own ops."""
    leaves = [t.detach().double().requires_grad_() for t in (h, weight, bias)]
    logits = F.linear(*leaves)
    counted = targets != ignore_index
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index) if counted.any() else logits.sum() * 0
    grads = torch.autograd.grad(loss, leaves)
    num_correct = ((logits.argmax(-1) == targets) & counted).sum().item()
    return loss.detach(), torch.logsumexp(logits, -1).detach(), num_correct, grads


def pytorch_in_dtype(h, weight, bias, targets):
    """PyTorch's own loss, lse and gradients in the inputs' dtype (logits rounded to it): the error the 2x rule
    allows twice of."""
    logits = F.linear(h, weight, bias)
    loss = F.cross_entropy(logits, targets, ignore_index=-100)
    return loss, torch.logsumexp(logits, -1), torch.autograd.grad(loss, (h, weight, bias))


@pytest.mark.parametrize("rows", [1, 7, 130])
def test_loss_lse_and_gradients_match_cross_entropy(rows):
    # float64 inputs run the reference.
    h, weight, bias, targets = inputs(rows, dtype=torch.float64)
    targets[::3] = -100
    out = gen_head(h, weight, bias, targets)
    logits = h @ weight.t() + bias
    expected = F.cross_entropy(logits, targets, ignore_index=-100) if (targets != -100).any() else logits.sum() * 0
    assert torch.allclose(out.loss, expected, rtol=1e-12)
    assert torch.allclose(out.lse, torch.logsumexp(logits, -1), rtol=1e-12)
    counted = targets != -100
    assert out.num_correct.item() == ((logits.argmax(-1) == targets) & counted).sum().item()
    grads = torch.autograd.grad(out.loss, (h, weight, bias))
    expected_grads = torch.autograd.grad(expected, (h, weight, bias), allow_unused=True)
    for grad, expected_grad in zip(grads, expected_grads):
        assert torch.allclose(grad, expected_grad if expected_grad is not None else torch.zeros_like(grad))


# (M, V, E): one row; several row and vocabulary tiles (128 x 1024) with ragged ends; the full BERT vocabulary;
# M = 4101 (33 row tiles); E = 768 (ELECTRA-Base).
SHAPES = [(1, 50, 64), (77, 1000, 128), (130, 50, 256), (300, 2500, 64), (77, 30522, 64), (4101, 1000, 64),
          (33, 1000, 768)]


@pytest.mark.parametrize("rows,vocab,hidden", SHAPES)
def test_float32_matches_float64_cross_entropy(provider, rows, vocab, hidden):
    h, weight, bias, targets = inputs(rows, seed=rows + vocab, vocab=vocab, hidden=hidden)
    targets[1::3] = -100
    out = gen_head(h, weight, bias, targets, backend=provider)
    loss, lse, num_correct, expected_grads = float64_expected(h, weight, bias, targets)
    assert out.loss.dtype == out.lse.dtype == torch.float32
    assert relative_error(out.loss, loss) < 1e-5
    assert relative_error(out.lse, lse) < 1e-5
    # A float32 rounding can flip an argmax between two logits within ~1e-6 of each other: allow one such row.
    assert abs(out.num_correct.item() - num_correct) <= 1
    grads = torch.autograd.grad(out.loss, (h, weight, bias))
    for grad, expected, name in zip(grads, expected_grads, ("h", "weight", "bias")):
        assert grad.dtype == torch.float32
        assert relative_error(grad, expected) < 1e-5, name
    assert out.samples.shape == (rows,) and out.samples.dtype == torch.int64
    assert ((out.samples >= 0) & (out.samples < vocab)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_inputs_within_twice_pytorchs_own_error(provider, dtype):
    h, weight, bias, targets = inputs(200, seed=5, dtype=dtype, vocab=1500, hidden=128)
    targets[::4] = -100
    loss, lse, _, expected_grads = float64_expected(h, weight, bias, targets)
    torch_loss, torch_lse, torch_grads = pytorch_in_dtype(h, weight, bias, targets)
    with KernelsRan(*(() if provider == "reference" else ("gen_head", "gen_head_backward"))):
        out = gen_head(h, weight, bias, targets, backend=provider)
        grads = torch.autograd.grad(out.loss, (h, weight, bias))
    assert relative_error(out.loss, loss) <= 2 * relative_error(torch_loss, loss)
    assert relative_error(out.lse, lse) <= 2 * relative_error(torch_lse, lse)
    for grad, torch_grad, expected, name in zip(grads, torch_grads, expected_grads, ("h", "weight", "bias")):
        assert grad.dtype == dtype, name
        assert relative_error(grad, expected) <= 2 * relative_error(torch_grad, expected), name


def test_mixed_dtypes_as_under_autocast(provider):
    # Under autocast the head gets bfloat16 h and the float32 embedding table.
    h, weight, bias, targets = inputs(50, seed=6, vocab=1200, hidden=64)
    h_low = h.detach().bfloat16().requires_grad_()
    out = gen_head(h_low, weight, bias, targets, backend=provider)
    loss, _, _, expected_grads = float64_expected(h_low, weight, bias, targets)
    grads = torch.autograd.grad(out.loss, (h_low, weight, bias))
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    assert relative_error(out.loss, loss) < 1e-5
    assert relative_error(grads[1], expected_grads[1]) < 1e-5
    assert relative_error(grads[0], expected_grads[0]) < 1e-2


def test_non_contiguous_h(provider):
    h, weight, bias, targets = inputs(150, seed=7, vocab=1100, hidden=64)
    wide = torch.randn(64, 300, generator=torch.Generator().manual_seed(1)).requires_grad_()
    strided = wide.t()[::2]  # [150, 64], strides (2, 300)
    assert not strided.is_contiguous()
    out = gen_head(strided, weight, bias, targets, generator=torch.Generator().manual_seed(4), backend=provider)
    dense = gen_head(strided.detach().contiguous(), weight, bias, targets, generator=torch.Generator().manual_seed(4),
                     backend=provider)
    loss, lse, _, expected_grads = float64_expected(strided, weight, bias, targets)
    assert relative_error(out.loss, loss) < 1e-5 and relative_error(out.lse, lse) < 1e-5
    assert torch.equal(out.samples, dense.samples)
    grad_wide, grad_weight = torch.autograd.grad(out.loss, (wide, weight))
    assert relative_error(grad_wide.t()[::2], expected_grads[0]) < 1e-5
    assert not grad_wide.t()[1::2].any()
    assert relative_error(grad_weight, expected_grads[1]) < 1e-5


@pytest.mark.parametrize("rows", [0, 4])
def test_no_counted_row_gives_zero_loss_and_zero_gradients(provider, rows):
    h, weight, bias, targets = inputs(rows)
    targets[:] = -100
    out = gen_head(h, weight, bias, targets, backend=provider)
    assert out.loss.item() == 0.0 and out.num_correct.item() == 0 and out.samples.shape == (rows,)
    out.loss.backward()
    assert not h.grad.any() and not weight.grad.any() and not bias.grad.any()


def test_other_ignore_index(provider):
    h, weight, bias, targets = inputs(40, seed=8)
    targets[::2] = 7  # ignore_index 7: these rows do not count, row targets 7 elsewhere would not count either
    with torch.no_grad():
        bias[7] += 30.0  # every row predicts 7: an ignored row counted as correct would show in num_correct
    out = gen_head(h, weight, bias, targets, ignore_index=7, backend=provider)
    loss, _, num_correct, expected_grads = float64_expected(h, weight, bias, targets, ignore_index=7)
    assert num_correct == 0
    assert relative_error(out.loss, loss) < 1e-5 and out.num_correct.item() == num_correct
    for grad, expected in zip(torch.autograd.grad(out.loss, (h, weight, bias)), expected_grads):
        assert relative_error(grad, expected) < 1e-5


def chi_square(counts, probabilities):
    expected = probabilities * counts.sum()
    return ((counts - expected) ** 2 / expected).sum().item()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_samples_follow_the_softmax(provider, temperature):
    # One row repeated: every sample is an independent draw from softmax(logits / T) over 8 tokens.
    vocab, draws = 8, 40_000
    generator = torch.Generator().manual_seed(1)
    h = torch.randn(1, 4, generator=generator).expand(draws, 4)
    weight = torch.randn(vocab, 4, generator=generator)
    bias = torch.zeros(vocab)
    out = gen_head(h, weight, bias, torch.zeros(draws, dtype=torch.long), temperature=temperature,
                   generator=torch.Generator().manual_seed(2), backend=provider)
    probabilities = torch.softmax((h[0].double() @ weight.t().double()) / temperature, -1)
    counts = torch.bincount(out.samples, minlength=vocab).double()
    # 7 degrees of freedom: 24.3 is the 0.1% tail.
    assert chi_square(counts, probabilities) < 24.3


def test_samples_follow_the_softmax_across_vocabulary_tiles(provider):
    # 3000 tokens (three vocabulary tiles) in 6 groups of 500: the group counts against the group probabilities.
    vocab, draws, groups = 3000, 6000, 6
    generator = torch.Generator().manual_seed(3)
    h = torch.randn(1, 16, generator=generator).expand(draws, 16)
    weight = 0.3 * torch.randn(vocab, 16, generator=generator)
    bias = torch.linspace(-1.0, 1.0, vocab)
    out = gen_head(h, weight, bias, torch.zeros(draws, dtype=torch.long), generator=torch.Generator().manual_seed(4),
                   backend=provider)
    probabilities = torch.softmax(h[0].double() @ weight.t().double() + bias.double(), -1)
    counts = torch.bincount(out.samples // (vocab // groups), minlength=groups).double()
    # 5 degrees of freedom: 20.5 is the 0.1% tail.
    assert chi_square(counts, probabilities.view(groups, -1).sum(1)) < 20.5


def test_noise_is_the_philox_contract(provider):
    # Zero logits: the sample is the column with the largest uniform, i.e. the largest top 23 bits of Philox word
    # column % 4 of counter (column / 4, row, 0xFFFFFFFF, 0x67656E68) under the seed gen_head draws.
    rows, vocab = 20, 1100
    h, weight, bias = torch.zeros(rows, 8), torch.zeros(vocab, 8), torch.zeros(vocab)
    out = gen_head(h, weight, bias, torch.zeros(rows, dtype=torch.long), generator=torch.Generator().manual_seed(9),
                   backend=provider)
    seed = int(torch.randint(-2**63, 2**63 - 1, (1,), dtype=torch.int64, generator=torch.Generator().manual_seed(9)))
    k0, k1 = torch.tensor(seed & 0xFFFFFFFF), torch.tensor((seed >> 32) & 0xFFFFFFFF)
    column = torch.arange(vocab).expand(rows, vocab)
    row = torch.arange(rows).unsqueeze(1).expand(rows, vocab)
    words = torch.stack(philox4x32_10(column // 4, row, torch.full_like(row, GEN_HEAD_STREAM[0]),
                                      torch.full_like(row, GEN_HEAD_STREAM[1]), k0, k1), -1)
    word = words.gather(-1, (column % 4).unsqueeze(-1)).squeeze(-1)
    assert torch.equal(out.samples, (word >> 9).argmax(-1))
    # Every logit ties: the prediction is the first column, as torch.argmax picks, so every target 0 is correct.
    assert out.num_correct.item() == rows


def test_disallow_correct_never_draws_the_target_and_seed_reproduces(provider):
    h, weight, bias, targets = inputs(500)
    targets[:] = 7
    with torch.no_grad():
        bias[7] += 30.0  # the target would be drawn almost always
    run = lambda **kwargs: gen_head(h, weight, bias, targets, generator=torch.Generator().manual_seed(3),  # noqa: E731
                                    backend=provider, **kwargs)
    out = run(disallow_correct=True)
    assert not (out.samples == targets).any()
    assert torch.equal(out.samples, run(disallow_correct=True).samples)
    plain = run()
    assert (plain.samples == targets).float().mean() > 0.9
    other_seed = gen_head(h, weight, bias, targets, disallow_correct=True, backend=provider,
                          generator=torch.Generator().manual_seed(4))
    assert (other_seed.samples != out.samples).float().mean() > 0.5


@pytest.mark.parametrize("temperature,disallow_correct", [(1.0, False), (0.7, True), (3.0, False)])
def test_kernel_and_reference_draw_the_same_tokens(temperature, disallow_correct):
    h, weight, bias, targets = inputs(300, seed=11, vocab=2500, hidden=64)
    targets[::5] = -100
    with torch.no_grad():
        bias[-4:] += 3.0  # the columns past the last multiple of 8 (the vector loops' scalar tail) win often
    runs = [gen_head(h, weight, bias, targets, temperature=temperature, disallow_correct=disallow_correct,
                     generator=torch.Generator().manual_seed(5), backend=backend) for backend in (None, "reference")]
    assert torch.equal(runs[0].samples, runs[1].samples)
    assert runs[0].num_correct.item() == runs[1].num_correct.item()
    assert relative_error(runs[0].lse, runs[1].lse) < 1e-6


def test_cpu_baseline_build_draws_the_same_noise():
    # The Gumbel noise's Philox words come from an 8-lane AVX2 loop or, on CPUs without AVX2, a scalar one (the
    # choice is made once per process): the baseline build must keep the contract and the reference's tokens too.
    run_on_baseline_cpu_build("""
import test_gen_head as t
t.test_noise_is_the_philox_contract(None)
for temperature, disallow_correct in [(1.0, False), (0.7, True)]:
    t.test_kernel_and_reference_draw_the_same_tokens(temperature, disallow_correct)
""")


def forward_backward(h, weight, bias, targets, **kwargs):
    out = gen_head(h, weight, bias, targets, generator=torch.Generator().manual_seed(6), **kwargs)
    return (*out, *torch.autograd.grad(out.loss, (h, weight, bias)))


# 300 rows = 2 full row tiles and one of 44, 2500 columns; 5 rows: one row tile, so every task runs alone, and
# with 2 threads MKL splits a [5 x 1024] x [1024 x 256] GEMM along K unless the kernel keeps it on one thread.
@pytest.mark.parametrize("rows,vocab,hidden,dtype", [(300, 2500, 64, torch.float32), (300, 2500, 64, torch.bfloat16),
                                                     (5, 3000, 256, torch.float32)])
def test_cpu_result_does_not_depend_on_thread_count(rows, vocab, hidden, dtype):
    h, weight, bias, targets = inputs(rows, seed=12, dtype=dtype, vocab=vocab, hidden=hidden)
    targets[::7] = -100
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = forward_backward(h, weight, bias, targets, disallow_correct=True)
        torch.set_num_threads(max(2, threads))
        multi = forward_backward(h, weight, bias, targets, disallow_correct=True)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, multi):
        assert torch.equal(a, b)


def op_inputs(dtype=torch.float32):
    h, weight, bias, targets = inputs(21, seed=13, dtype=dtype, vocab=1030, hidden=16)
    targets[::4] = -100
    return (h, weight, bias, targets, torch.tensor([42], dtype=torch.int64), 0.8, True, -100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    torch.library.opcheck(OP, op_inputs(dtype))


def test_torch_compile_fullgraph_no_graph_breaks():
    h, weight, bias, targets = inputs(70, seed=14, vocab=1500, hidden=32)
    targets[::3] = -100

    def objective(a, b, c):
        out = gen_head(a, b, c, targets, temperature=0.9)
        return out.loss, out.lse, out.num_correct, out.samples

    # The Gumbel noise's seed is a draw from torch's generator; fallback_random makes the compiled graph draw it
    # from eager's generator, so the same manual_seed gives the same samples.
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(objective, fullgraph=True)
        torch.manual_seed(3)
        traced = compiled(h, weight, bias)
    torch.manual_seed(3)
    eager = objective(h, weight, bias)
    for a, b in zip(eager, traced):
        assert torch.equal(a, b)
    assert not torch.equal(objective(h, weight, bias)[3], eager[3])  # the next seed: other samples
    leaves = (h, weight, bias)
    for a, b in zip(torch.autograd.grad(eager[0], leaves), torch.autograd.grad(traced[0], leaves)):
        assert torch.equal(a, b)


BAD = [
    (dict(h=torch.randn(3, E + 1)), ValueError, "h must be \\[M, E\\] and weight \\[V, E\\] with the same E"),
    (dict(bias=torch.randn(V + 1)), ValueError, "bias must be \\[V=1000\\]"),
    (dict(targets=torch.zeros(3, dtype=torch.int32)), ValueError, "targets must be int64 of shape \\[M=3\\]"),
    (dict(targets=torch.zeros(2, dtype=torch.long)), ValueError, "targets must be int64 of shape \\[M=3\\]"),
    (dict(temperature=0.0), ValueError, "temperature must be a positive number"),
    (dict(h=torch.zeros(3, E, dtype=torch.long)), TypeError, "must be floating point"),
    (dict(targets=torch.tensor([0, V, 2])), ValueError, "targets must lie in \\[0, V = 1000\\)"),
    (dict(targets=torch.tensor([0, -1, 2])), ValueError, "targets must lie in \\[0, V = 1000\\)"),
]


@pytest.mark.parametrize("changes,error,message", BAD)
def test_bad_inputs_name_the_argument(provider, changes, error, message):
    h, weight, bias, targets = inputs(3)
    arguments = dict(h=h, weight=weight, bias=bias, targets=targets)
    changes = dict(changes)  # BAD's dicts are shared by both providers
    temperature = changes.pop("temperature", 1.0)
    arguments.update(changes)
    with pytest.raises(error, match=message):
        gen_head(**arguments, temperature=temperature, backend=provider)


def targets_with(row, value):
    targets = op_inputs()[3].clone()
    targets[row] = value
    return targets


OP_BAD = [
    (dict(targets=targets_with(1, 1030)), ValueError, "gen_head: targets must lie in \\[0, V = 1030\\)"),
    (dict(targets=targets_with(2, -5)), ValueError, "got -5 at row 2"),
    (dict(ignore_index=0), ValueError, "got -100 at row 0"),
    (dict(seed=torch.tensor([1, 2])), ValueError, "gen_head: seed must be an int64 tensor with one element"),
    (dict(temperature=float("inf")), ValueError, "gen_head: temperature must be a positive number"),
    (dict(h=torch.randn(21, 16, dtype=torch.float64)), TypeError, "gen_head: h must be float32, bfloat16"),
    (dict(weight=torch.randn(1030, 17)), ValueError, "gen_head: weight must be \\[V, E\\] with h's E = 16"),
    (dict(bias=torch.randn(3)), ValueError, "gen_head: bias must be \\[V\\] = \\[1030\\]"),
]


@pytest.mark.parametrize("changes,error,message", OP_BAD)
def test_op_checks_name_the_argument(changes, error, message):
    # The op itself, below the Python checks: it must refuse before it reads a target's column.
    names = ["h", "weight", "bias", "targets", "seed", "temperature", "disallow_correct", "ignore_index"]
    arguments = dict(zip(names, (t.detach() if isinstance(t, torch.Tensor) else t for t in op_inputs())))
    arguments.update(changes)
    with pytest.raises(error, match=message):
        OP(*arguments.values())


# --- The CUDA kernels: on the GPU ("cuda") and their device code on the CPU ("emulated"). ---
# (M, V, E) per target: one row; a ragged row block and vocabulary tile; hidden that is no multiple of 8 (padded);
# on the GPU also the full BERT vocabulary, 4101 rows (33 row blocks, 5 backward chunks) and E = 768: emulated,
# 4101 x 1000 x 64 took 20 s and the full-vocabulary shapes more than 6 minutes together (stopped there);
# test_device_strided_h_mixed_dtypes_and_chunked_backward covers the backward's chunks there.
DEVICE_SHAPES = {
    "emulated": [(1, 50, 64), (77, 600, 96), (130, 200, 24), (77, 1000, 128)],
    "cuda": [(1, 50, 64), (77, 1000, 128), (130, 200, 24), (77, 30522, 256), (4101, 30522, 768), (4101, 1000, 64)],
}


def device_inputs(rows, vocab, hidden, dtype, device, seed=0):
    h, weight, bias, targets = inputs(rows, seed=seed, vocab=vocab, hidden=hidden)
    return [t.detach().to(device=device, dtype=dtype).requires_grad_() for t in (h, weight, bias)] + \
        [targets.to(device)]


DEVICE_TARGETS = [target for target in TARGETS if target != "cpu"]
DEVICE_CASES = [pytest.param(target, *shape, marks=REQUIRES_CUDA if target == "cuda" else (),
                             id=f"{target}-{'x'.join(map(str, shape))}")
                for target, shapes in DEVICE_SHAPES.items() for shape in shapes]


# Parametrizing `target` directly overrides conftest's fixture of that name (every target); its `device` and
# `backend` fixtures follow it.
on_device_targets = pytest.mark.parametrize("target", DEVICE_TARGETS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("target,rows,vocab,hidden", DEVICE_CASES)
def test_device_kernels_within_twice_pytorchs_own_error(target, device, backend, dtype, rows, vocab, hidden):
    h, weight, bias, targets = device_inputs(rows, vocab, hidden, dtype, device, seed=rows + vocab)
    targets[1::3] = -100
    loss, lse, num_correct, expected_grads = float64_expected(h, weight, bias, targets)
    torch_loss, torch_lse, torch_grads = pytorch_in_dtype(h, weight, bias, targets)
    out = gen_head(h, weight, bias, targets, backend=backend)
    grads = torch.autograd.grad(out.loss, (h, weight, bias))
    assert out.loss.dtype == out.lse.dtype == torch.float32 and out.samples.dtype == torch.int64
    assert relative_error(out.loss, loss) <= 2 * relative_error(torch_loss, loss) + 1e-6
    assert relative_error(out.lse, lse) <= 2 * relative_error(torch_lse, lse) + 1e-6
    # The logits are float32 sums of exact products: an argmax flips only between logits ~1e-6 apart.
    assert abs(out.num_correct.item() - num_correct) <= 1
    for grad, torch_grad, expected, name in zip(grads, torch_grads, expected_grads, ("h", "weight", "bias")):
        assert grad.dtype == dtype, name
        assert relative_error(grad, expected) <= 2 * relative_error(torch_grad, expected), name
    assert ((out.samples >= 0) & (out.samples < vocab)).all()


def test_the_kernels_fit_a_consumer_gpu(monkeypatch):
    """ELECTRA_EXT_EMULATED_SM="86": an RTX 3090's limits (99 KiB of shared memory per block, 100 KiB and 1,536
    threads per SM; the RTX 40xx, L4 and RTX 50xx have the same), which set the occupancy and so the vocabulary
    split and the grad_h GEMM's k split. Forward and backward within the error rule there."""
    monkeypatch.setenv("ELECTRA_EXT_EMULATED_SM", "86")
    test_device_kernels_within_twice_pytorchs_own_error("emulated", "cpu", "emulated", torch.bfloat16, 77, 1000, 128)


@on_device_targets
def test_device_kernels_draw_the_cpu_kernels_tokens(target, device, backend):
    # Same Philox noise and the same float32 logits up to summation order: the same tokens, row for row.
    h, weight, bias, targets = device_inputs(100, 700, 40, torch.bfloat16, device, seed=21)
    targets[::5] = -100
    for temperature, disallow_correct in [(1.0, True), (0.6, False)]:
        runs = [gen_head(h.cpu(), weight.cpu(), bias.cpu(), targets.cpu(), temperature=temperature,
                         disallow_correct=disallow_correct, generator=torch.Generator().manual_seed(8), backend=b)
                for b in (None, "reference")]
        seed_generator = torch.Generator(device).manual_seed(8)
        out = gen_head(h, weight, bias, targets, temperature=temperature, disallow_correct=disallow_correct,
                       generator=seed_generator if device == "cuda" else torch.Generator().manual_seed(8),
                       backend=backend)
        assert torch.equal(runs[0].samples, runs[1].samples)
        if device == "cpu":  # a CUDA generator draws another seed than a CPU one
            assert torch.equal(out.samples.cpu(), runs[0].samples)
        assert out.num_correct.item() == runs[0].num_correct.item()
        assert relative_error(out.lse, runs[0].lse) < 1e-6


@on_device_targets
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_device_samples_follow_the_softmax(target, device, backend, temperature):
    vocab, draws = 8, 40_000
    generator = torch.Generator().manual_seed(1)
    h = torch.randn(1, 16, generator=generator).expand(draws, 16).bfloat16()
    weight = torch.randn(vocab, 16, generator=generator).bfloat16()
    bias = torch.zeros(vocab)
    out = gen_head(h.to(device), weight.to(device), bias.to(device), torch.zeros(draws, dtype=torch.long, device=device),
                   temperature=temperature, generator=torch.Generator(device).manual_seed(2), backend=backend)
    probabilities = torch.softmax((h[0].double() @ weight.t().double()) / temperature, -1)
    counts = torch.bincount(out.samples.cpu(), minlength=vocab).double()
    assert chi_square(counts, probabilities) < 24.3  # 7 degrees of freedom: the 0.1% tail


@on_device_targets
def test_device_noise_is_the_philox_contract(target, device, backend):
    # Zero logits: the sample is the column with the largest 23-bit uniform (see test_noise_is_the_philox_contract).
    rows, vocab = 20, 1100
    zeros = [torch.zeros(rows, 8, dtype=torch.bfloat16), torch.zeros(vocab, 8, dtype=torch.bfloat16),
             torch.zeros(vocab)]
    expected = gen_head(*zeros, torch.zeros(rows, dtype=torch.long), generator=torch.Generator().manual_seed(9),
                        backend="reference").samples
    out = gen_head(*(t.to(device) for t in zeros), torch.zeros(rows, dtype=torch.long, device=device),
                   generator=torch.Generator().manual_seed(9), backend=backend) if device == "cpu" else None
    if out is not None:
        assert torch.equal(out.samples, expected)
    # Seeded from a tensor, so the CUDA op is checked against the same key too.
    seed = torch.tensor([1234], dtype=torch.int64)
    op_out = OP(*(t.to(device) for t in zeros), torch.zeros(rows, dtype=torch.long, device=device), seed.to(device),
                1.0, False, -100, emulated=backend == "emulated")
    reference_out = OP(*(t.float() for t in zeros), torch.zeros(rows, dtype=torch.long), seed, 1.0, False, -100)
    assert torch.equal(op_out[1].cpu(), reference_out[1])
    # Every logit ties, across vocabulary tiles too: the prediction is the first column, so every target 0 is
    # correct.
    assert op_out[3].item() == rows


@on_device_targets
def test_device_disallow_correct_and_seed(target, device, backend):
    h, weight, bias, targets = device_inputs(150, 300, 32, torch.bfloat16, device, seed=3)
    targets[:] = 7
    with torch.no_grad():
        bias[7] += 30.0
    run = lambda seed, **kwargs: gen_head(h, weight, bias, targets, backend=backend,  # noqa: E731
                                          generator=torch.Generator(device).manual_seed(seed), **kwargs)
    out = run(3, disallow_correct=True)
    assert not (out.samples == targets).any()
    assert torch.equal(out.samples, run(3, disallow_correct=True).samples)
    assert (run(3).samples == targets).float().mean() > 0.9
    assert (run(4, disallow_correct=True).samples != out.samples).float().mean() > 0.5


@on_device_targets
def test_device_other_ignore_index(target, device, backend):
    h, weight, bias, targets = device_inputs(40, 300, 32, torch.bfloat16, device, seed=8)
    targets[::2] = 7
    with torch.no_grad():
        bias[7] += 30.0  # every row predicts 7: an ignored row counted as correct would show in num_correct
    out = gen_head(h, weight, bias, targets, ignore_index=7, backend=backend)
    loss, _, num_correct, _ = float64_expected(h, weight, bias, targets, ignore_index=7)
    assert num_correct == 0 and out.num_correct.item() == 0
    assert relative_error(out.loss, loss) < 1e-5


@on_device_targets
@pytest.mark.parametrize("rows", [0, 5])
def test_device_no_counted_row(target, device, backend, rows):
    h, weight, bias, targets = device_inputs(rows, 100, 16, torch.bfloat16, device)
    targets[:] = -100
    out = gen_head(h, weight, bias, targets, backend=backend)
    assert out.loss.item() == 0.0 and out.num_correct.item() == 0 and out.samples.shape == (rows,)
    out.loss.backward()
    assert not h.grad.any() and not weight.grad.any() and not bias.grad.any()


@on_device_targets
def test_device_strided_h_mixed_dtypes_and_chunked_backward(target, device, backend, monkeypatch):
    # h a strided view (copied to aligned rows), float32 weight and bias (autocast's mix: cast to h's dtype),
    # and a backward in chunks of 128 rows (no workspace budget): 300 rows = 3 chunks, the last ragged.
    generator = torch.Generator().manual_seed(17)
    wide = torch.randn(48, 600, generator=generator).bfloat16().to(device).requires_grad_()
    h = wide.t()[::2]  # [300, 48], strides (2, 600)
    weight = (0.4 * torch.randn(200, 48, generator=generator)).to(device).requires_grad_()
    bias = (0.1 * torch.randn(200, generator=generator)).to(device).requires_grad_()
    targets = torch.randint(0, 200, (300,), generator=generator).to(device)
    targets[::4] = -100
    # The kernels compute with the weight rounded to bfloat16, as F.linear under autocast would.
    loss, _, _, expected_grads = float64_expected(h, weight.bfloat16(), bias, targets)

    def run():
        out = gen_head(h, weight, bias, targets, backend=backend, generator=torch.Generator(device).manual_seed(1))
        return (out.loss, out.samples, *torch.autograd.grad(out.loss, (wide, weight, bias)))

    whole = run()
    monkeypatch.setenv("ELECTRA_EXT_GEN_HEAD_WORKSPACE_MIB", "0")
    chunked, again = run(), run()
    for a, b in zip(chunked, again):
        assert torch.equal(a, b)  # deterministic
    for out in (whole, chunked):
        assert relative_error(out[0], loss) < 1e-5
        grad_wide, grad_weight, grad_bias = out[2:]
        assert grad_wide.dtype == torch.bfloat16 and grad_weight.dtype == grad_bias.dtype == torch.float32
        assert relative_error(grad_wide.t()[::2], expected_grads[0]) < 1e-2
        assert not grad_wide.t()[1::2].any()
        # G is rounded to bfloat16 before the products (2^-9 relative per entry, averaged over many).
        assert relative_error(grad_weight, expected_grads[1]) < 5e-3
        assert relative_error(grad_bias, expected_grads[2]) < 1e-5
    assert torch.equal(whole[1], chunked[1])


@on_device_targets
def test_device_h_contiguous_at_an_unaligned_offset(target, device, backend):
    # h contiguous but starting 3 elements into its storage: the kernels' 16-byte loads need an aligned copy,
    # which .contiguous() does not make (the launch failed with an invalid-argument error).
    h, weight, bias, targets = device_inputs(30, 120, 32, torch.bfloat16, device, seed=5)
    storage = torch.empty(h.numel() + 3, device=device, dtype=h.dtype)
    storage[3:] = h.detach().reshape(-1)
    unaligned = storage[3:].view(h.shape).requires_grad_()
    assert unaligned.is_contiguous() and unaligned.data_ptr() % 16

    def run(rows):
        out = gen_head(rows, weight, bias, targets, backend=backend, generator=torch.Generator(device).manual_seed(4))
        return (out.loss, out.samples, *torch.autograd.grad(out.loss, (rows, weight, bias)))

    for a, e in zip(run(unaligned), run(h)):
        assert torch.equal(a, e)


@on_device_targets
def test_device_op_checks(target, device, backend):
    h, weight, bias, targets = device_inputs(21, 230, 16, torch.bfloat16, device, seed=13)
    seed = torch.tensor([42], dtype=torch.int64, device=device)
    emulated = backend == "emulated"
    torch.library.opcheck(OP, (h, weight, bias, targets, seed, 0.8, True, -100), {"emulated": emulated})
    with pytest.raises(TypeError, match="gen_head: the CUDA kernels take float16 or bfloat16 h"):
        OP(h.detach().float(), weight, bias, targets, seed, 1.0, False, -100, emulated=emulated)
    with pytest.raises(ValueError, match="gen_head: seed must be an int64 tensor with one element"):
        OP(h, weight, bias, targets, seed.float(), 1.0, False, -100, emulated=emulated)
    bad_targets = targets.clone()
    bad_targets[3] = 230
    if device == "cpu":
        with pytest.raises(ValueError, match="got 230 at row 3"):
            OP(h, weight, bias, bad_targets, seed, 1.0, False, -100, emulated=emulated)
    else:  # reading the targets would synchronise the device: the loss says it instead
        assert OP(h, weight, bias, bad_targets, seed, 1.0, False, -100)[0].isnan().item()


def test_emulated_needs_16_bit_h():
    h, weight, bias, targets = inputs(3)
    with pytest.raises(ValueError, match="backend='emulated' runs the CUDA kernels, which take float16/bfloat16 h"):
        gen_head(h, weight, bias, targets, backend="emulated")
