"""electra_ext.ops.disc_head against its float64 PyTorch reference, on every target (CPU, emulated, CUDA)."""
import functools

import pytest
import torch
import torch.nn.functional as F

import electra_ext
from electra_ext.ops import disc_head, disc_head_from_ids, has_kernel
from electra_ext.ops.reference import disc_head_reference
from op_testing import KernelsRan, CUDA_AVAILABLE, relative_error

OP = torch.ops.electra_ext.disc_head.default


@pytest.fixture
def op(backend):
    """disc_head as the target runs it."""
    return functools.partial(disc_head, backend=backend)


def make_inputs(n, h, device, dtype=torch.float32, padding="random", seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=generator).to(device=device, dtype=dtype)
    w = (torch.randn(h, generator=generator) / h**0.5).to(device)
    b = torch.randn(1, generator=generator).to(device)
    labels = (torch.rand(n, generator=generator) < 0.15).to(device)
    valid = {
        "random": torch.rand(n, generator=generator) < 0.8,
        "none": torch.ones(n, dtype=torch.bool),  # no padding
        "all": torch.zeros(n, dtype=torch.bool),  # every row is padding
    }[padding].to(device)
    return x, w, b, labels, valid


def forward_backward(fn, x, w, b, labels, valid, logits_weight=None):
    """Runs fn and returns (logits, loss, dx, dw, db) for the objective loss (+ logits . logits_weight)."""
    x, w, b = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    logits, loss = fn(x, w, b, labels, valid)
    objective = loss if logits_weight is None else loss + (logits * logits_weight).sum()
    dx, dw, db = torch.autograd.grad(objective, (x, w, b))
    return logits.detach(), loss.detach(), dx, dw, db


def float64_reference(x, w, b, labels, valid, logits_weight=None):
    return forward_backward(disc_head_reference, x.double(), w.double(), b.double(), labels, valid,
                            None if logits_weight is None else logits_weight.double())


@pytest.mark.parametrize("n", [1, 7, 4096 + 3])
@pytest.mark.parametrize("h", [64, 256, 768, 1000])
@pytest.mark.parametrize("padding", ["random", "none", "all"])
def test_float32_matches_float64_reference(device, op, n, h, padding):
    inputs = make_inputs(n, h, device, padding=padding)
    expected = float64_reference(*inputs)
    actual = forward_backward(op, *inputs)
    for name, a, e in zip(("logits", "loss", "dx", "dw", "db"), actual, expected):
        assert a.dtype == (inputs[0].dtype if name == "dx" else torch.float32), name
        assert relative_error(a, e) <= 1e-5, name


def test_all_padding_gives_zero_loss_and_zero_gradients(device, op):
    x, w, b, labels, valid = make_inputs(33, 64, device, padding="all")
    logits, loss, dx, dw, db = forward_backward(op, x, w, b, labels, valid)
    assert loss.item() == 0.0
    assert dx.abs().max().item() == 0.0 and dw.abs().max().item() == 0.0 and db.abs().max().item() == 0.0
    # The logits are still computed for every row.
    assert relative_error(logits, disc_head_reference(x.double(), w.double(), b.double(), labels, valid)[0]) < 1e-5


def test_gradient_flows_through_logits_too(device, op):
    inputs = make_inputs(129, 256, device)
    logits_weight = torch.randn(129, device=device)
    expected = float64_reference(*inputs, logits_weight=logits_weight)
    actual = forward_backward(op, *inputs, logits_weight=logits_weight)
    for name, a, e in zip(("logits", "loss", "dx", "dw", "db"), actual, expected):
        assert relative_error(a, e) <= 1e-5, name


@pytest.mark.parametrize("layout", ["row_slice", "every_other_row", "transposed", "unaligned_offset"])
def test_non_contiguous_x(device, op, layout):
    n, h = 65, 256
    base = torch.randn(2 * n + 1, 2 * h + 8, device=device)
    x = {
        "row_slice": base[:n, :h],  # rows 2h+8 apart
        "every_other_row": base[: 2 * n : 2, :h],
        "transposed": torch.randn(h, n, device=device).t(),  # column stride != 1: copied by the op
        "unaligned_offset": base[:n, 1 : h + 1],  # not 16-byte aligned: scalar loads
    }[layout]
    assert not x.is_contiguous()
    _, w, b, labels, valid = make_inputs(n, h, device)
    expected = float64_reference(x, w, b, labels, valid)
    actual = forward_backward(op, x, w, b, labels, valid)
    for name, a, e in zip(("logits", "loss", "dx", "dw", "db"), actual, expected):
        assert relative_error(a, e) <= 1e-5, name


def pytorch_low_precision(x, w, b, labels, valid):
    """What a user gets from plain PyTorch in x's dtype: every step (and its backward) in low precision."""
    logits = F.gelu(x) @ w.to(x.dtype) + b.to(x.dtype)
    per_row = F.binary_cross_entropy_with_logits(logits, labels.to(x.dtype), reduction="none")
    mask = valid.to(x.dtype)
    return logits, (per_row * mask).sum() / mask.sum().clamp_min(1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,h", [(7, 64), (65, 37), (1000, 768), (4096 + 3, 256)])
def test_low_precision_error_at_most_twice_pytorch(device, op, dtype, n, h):
    # FlashAttention's rule: against the float64 reference on the same (rounded) inputs, the kernel's error
    # is at most twice that of PyTorch's own implementation in the same precision.
    inputs = make_inputs(n, h, device, dtype=dtype)
    expected = float64_reference(*inputs)
    with KernelsRan("disc_head", "disc_head_backward"):
        actual = forward_backward(op, *inputs)
    pytorch = forward_backward(pytorch_low_precision, *inputs)
    for name, a, p, e in zip(("logits", "loss", "dx", "dw", "db"), actual, pytorch, expected):
        kernel_error = (a.double().cpu() - e.cpu()).abs().max().item()
        pytorch_error = (p.double().cpu() - e.cpu()).abs().max().item()
        floor = 1e-6 * e.abs().max().item()
        assert kernel_error <= 2 * pytorch_error + floor, f"{name}: {kernel_error} vs PyTorch {pytorch_error}"
    assert actual[2].dtype == dtype


@pytest.mark.parametrize("emulated_sm", ["86", "90"])
def test_the_backward_fits_the_shared_memory_it_finds(monkeypatch, emulated_sm):
    """The backward keeps a float32 row of H per warp in shared memory and takes as many warps (up to 8) as the
    device's per-block limit holds: at H = 4096 (16 KiB a row) 6 on an RTX 3090's 99 KiB (ELECTRA_EXT_EMULATED_SM
    "86"), 8 on an H100's 227. Both within the error rule."""
    monkeypatch.setenv("ELECTRA_EXT_EMULATED_SM", emulated_sm)
    test_low_precision_error_at_most_twice_pytorch("cpu", functools.partial(disc_head, backend="emulated"),
                                                   torch.bfloat16, 33, 4096)


def test_bitwise_deterministic(device, op):
    inputs = make_inputs(4096 + 3, 768, device)
    first, second = forward_backward(op, *inputs), forward_backward(op, *inputs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_cpu_result_does_not_depend_on_thread_count():
    inputs = make_inputs(4096 + 3, 256, "cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = forward_backward(disc_head, *inputs)
        torch.set_num_threads(max(2, threads))
        multi = forward_backward(disc_head, *inputs)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, multi):
        assert torch.equal(a, b)


def test_empty_batch(device, op):
    x, w, b, labels, valid = make_inputs(0, 64, device)
    logits, loss, dx, dw, db = forward_backward(op, x, w, b, labels, valid)
    assert logits.shape == (0,) and loss.item() == 0.0 and dx.shape == (0, 64)
    assert dw.abs().max().item() == 0.0 and db.item() == 0.0


def test_labels_from_ids(device, backend):
    x, w, b, _, valid = make_inputs(50, 64, device)
    original = torch.randint(0, 100, (5, 10), device=device)
    corrupted = torch.where(torch.rand(5, 10, device=device) < 0.3, original + 1, original)
    logits, loss = disc_head_from_ids(x, w, b, corrupted, original, valid, backend=backend)
    expected = disc_head_reference(x, w, b, (corrupted != original).reshape(-1), valid)
    assert relative_error(loss, expected[1]) <= 1e-5
    with pytest.raises(ValueError, match="original_ids"):
        disc_head_from_ids(x, w, b, corrupted, original[:, :5], valid, backend=backend)


def test_opcheck(device, backend):
    for padding in ("random", "all"):
        x, w, b, labels, valid = make_inputs(37, 64, device, padding=padding)
        torch.library.opcheck(OP, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), labels, valid),
                              {"emulated": backend == "emulated"})


def test_torch_compile_fullgraph_no_graph_breaks(device, op):
    inputs = make_inputs(300, 256, device)

    def objective(x, w, b, labels, valid):
        logits, loss = op(x, w, b, labels, valid)
        return loss + 0.1 * logits.sum()

    compiled = torch.compile(objective, fullgraph=True)
    eager = forward_backward(lambda *a: (torch.zeros(a[0].shape[0], device=device), objective(*a)), *inputs)
    traced = forward_backward(lambda *a: (torch.zeros(a[0].shape[0], device=device), compiled(*a)), *inputs)
    for a, b in zip(eager[1:], traced[1:]):
        assert relative_error(a, b) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_feeds_low_precision_and_returns_float32(device, op, dtype):
    head = electra_ext.modules.DiscriminatorHead(256).to(device)
    hidden = torch.randn(64, 256, device=device)
    labels = torch.rand(64, device=device) < 0.15
    valid = torch.rand(64, device=device) < 0.9
    w, b = head.dense_prediction.weight.view(-1), head.dense_prediction.bias
    with torch.autocast(device_type=device, dtype=dtype):
        # Autocast runs the dense layer in low precision; the op receives that output unchanged.
        pre_activation = head.dense(hidden)
        logits, loss = op(pre_activation, w, b, labels, valid)
    assert pre_activation.dtype == dtype
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    loss.backward()
    assert head.dense_prediction.weight.grad.dtype == torch.float32
    expected_logits, expected_loss = disc_head_reference(pre_activation.double(), w.double(), b.double(), labels,
                                                         valid)
    assert relative_error(logits, expected_logits) <= 1e-5
    assert relative_error(loss, expected_loss) <= 1e-5


def test_module_matches_dense_then_op():
    head = electra_ext.modules.DiscriminatorHead(64)
    hidden = torch.randn(3, 5, 64)
    labels, valid = torch.rand(3, 5) < 0.3, torch.rand(3, 5) < 0.8
    logits, loss = head(hidden, labels, valid)
    expected_logits, expected_loss = disc_head_reference(
        head.dense(hidden).reshape(-1, 64).double(), head.dense_prediction.weight.view(-1).double(),
        head.dense_prediction.bias.double(), labels.reshape(-1), valid.reshape(-1))
    assert logits.shape == (3, 5)
    assert relative_error(logits.reshape(-1), expected_logits) <= 1e-5
    assert relative_error(loss, expected_loss) <= 1e-5
    with pytest.raises(ValueError, match="labels and valid"):
        head(hidden, labels[:, :4], valid)


BAD_INPUTS = [
    # (what to change, expected error type, words the message must contain)
    (lambda x, w, b, l, v: (x[0], w, b, l, v), ValueError, "x must be 2-D"),
    (lambda x, w, b, l, v: (x.long(), w, b, l, v), TypeError, "x must be float32"),
    (lambda x, w, b, l, v: (x[:, :0], w[:0], b, l, v), ValueError, "H > 0"),
    (lambda x, w, b, l, v: (x, w[:-1], b, l, v), ValueError, "w must have shape [H]"),
    (lambda x, w, b, l, v: (x, w.long(), b, l, v), TypeError, "w must be a floating-point"),
    (lambda x, w, b, l, v: (x, w, b.expand(2), l, v), ValueError, "b must have shape [1]"),
    (lambda x, w, b, l, v: (x, w, b, l.float(), v), TypeError, "labels must be a bool"),
    (lambda x, w, b, l, v: (x, w, b, l[:-1], v), ValueError, "labels must have shape [N]"),
    (lambda x, w, b, l, v: (x, w, b, l, v.int()), TypeError, "valid must be a bool"),
    (lambda x, w, b, l, v: (x, w, b, l, v[None]), ValueError, "valid must have shape [N]"),
]


@pytest.mark.parametrize("mutate,error,words", BAD_INPUTS)
def test_bad_input_names_the_argument(device, op, mutate, error, words):
    inputs = mutate(*make_inputs(9, 64, device))
    with pytest.raises(error) as raised:
        op(*inputs)
    assert words in str(raised.value)


@pytest.mark.skipif(not CUDA_AVAILABLE, reason="no CUDA device on this machine")
def test_inputs_on_different_devices_are_rejected():
    """By the Python function, and by the kernel's own checks for a direct torch.ops call."""
    x, w, b, labels, valid = make_inputs(9, 64, "cuda")
    with pytest.raises(ValueError, match="x, w, b, labels and valid must be on one device, got cuda:0, cpu"):
        disc_head(x, w.cpu(), b, labels, valid)
    with pytest.raises(ValueError, match="w must be on the same device as x"):
        torch.ops.electra_ext.disc_head(x, w.cpu(), b, labels, valid)


def test_cuda_kernel_registered_when_built_with_cuda():
    assert has_kernel(OP, "cpu")
    assert has_kernel(OP, "cuda") == electra_ext.BUILD_INFO.WITH_CUDA


def test_module_state_dict_uses_hf_names():
    head = electra_ext.modules.DiscriminatorHead(64)
    assert sorted(head.state_dict()) == [
        "dense.bias", "dense.weight", "dense_prediction.bias", "dense_prediction.weight"]
    assert head.dense_prediction.weight.shape == (1, 64)
    with pytest.raises(ValueError, match="hidden_size"):
        electra_ext.modules.DiscriminatorHead(0)


def test_backend_selection_errors():
    x, w, b, labels, valid = make_inputs(9, 64, "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        disc_head(x, w, b, labels, valid, backend="triton")
    if CUDA_AVAILABLE:
        with pytest.raises(ValueError, match="needs CPU tensors"):
            disc_head(x.cuda(), w.cuda(), b.cuda(), labels.cuda(), valid.cuda(), backend="emulated")


def test_reference_backend_runs_the_reference():
    inputs = make_inputs(33, 64, "cpu")
    for a, e in zip(disc_head(*inputs, backend="reference"), disc_head_reference(*inputs)):
        assert torch.equal(a, e)


def test_float64_runs_the_reference_as_the_other_ops_do():
    """The kernels take float32, bfloat16 and float16 x; float64 (a gradcheck, a float64 model) runs the reference
    instead of raising, in float64."""
    x, w, b, labels, valid = (t.double() if t.is_floating_point() else t for t in make_inputs(9, 16, "cpu"))
    logits, loss = disc_head(x, w, b, labels, valid)
    assert logits.dtype == loss.dtype == torch.float64
    assert torch.equal(loss, disc_head_reference(x, w, b, labels, valid)[1])
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda *xwb: disc_head(*xwb, labels, valid)[1], (x, w, b))


def test_emulation_is_built():
    # CI must run the emulated CUDA kernels: a build without the emulation fails here instead of skipping.
    assert electra_ext.BUILD_INFO.WITH_EMULATION
