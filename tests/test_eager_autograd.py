"""The ops' eager autograd path (electra_ext/ops/eager_autograd.py) against the autograd registered with
torch.library: the public functions and torch.ops.electra_ext.* called with the same inputs must return the same
outputs and gradients, bit for bit, with and without gradients, on the CPU kernels and the emulated CUDA kernels.
Which path ran is read from the output's grad_fn."""
import pytest
import torch

from electra_ext.ops import attention_qkvpacked, disc_head, gen_head
from electra_ext.ops.reference import philox_seed

EAGER_NODE = "EagerAutogradBackward"
BACKENDS = [None, "emulated"]


def attention_case(backend):
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(3, 19, 3, 2, 32, generator=generator).to(torch.bfloat16)
    seqlens = torch.tensor([19, 7, 1], dtype=torch.int32)

    # Dropout on: both paths must draw the same mask from the same seed.
    def public(inputs):
        return attention_qkvpacked(inputs[0], seqlens=seqlens, dropout_p=0.25,
                                   generator=torch.Generator().manual_seed(5), backend=backend)

    def registered(inputs):
        batch, seq_len, _, heads, head_dim = inputs[0].shape
        seed = philox_seed(torch.device("cpu"), torch.Generator().manual_seed(5))
        out, _ = torch.ops.electra_ext.attention(inputs[0].reshape(batch * seq_len, 3, heads, head_dim), None, None,
                                                 None, seqlens, seq_len, 0.25, head_dim ** -0.5, seed,
                                                 emulated=backend == "emulated")
        return out.view(batch, seq_len, heads, head_dim)

    return [qkv], public, registered


def gen_head_case(backend):
    generator = torch.Generator().manual_seed(1)
    h = torch.randn(9, 32, generator=generator).to(torch.bfloat16)
    weight = torch.randn(50, 32, generator=generator).to(torch.bfloat16)
    bias = torch.randn(50, generator=generator).to(torch.bfloat16)
    targets = torch.tensor([3, -100, 49, 0, 7, 7, -100, 12, 30])
    if backend != "emulated":
        h, weight, bias = h.float(), weight.float(), bias.float()

    def public(inputs):
        return gen_head(*inputs, targets, generator=torch.Generator().manual_seed(9), backend=backend).loss

    def registered(inputs):
        seed = philox_seed(torch.device("cpu"), torch.Generator().manual_seed(9))
        return torch.ops.electra_ext.gen_head(*inputs, targets, seed, 1.0, False, -100,
                                              emulated=backend == "emulated")[0]

    return [h, weight, bias], public, registered


def disc_head_case(backend):
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(13, 24, generator=generator)
    w = torch.randn(24, generator=generator)
    b = torch.randn(1, generator=generator)
    labels = torch.rand(13, generator=generator) < 0.3
    valid = torch.arange(13) < 11

    def public(inputs):
        return disc_head(*inputs, labels, valid, backend=backend)[1]

    def registered(inputs):
        return torch.ops.electra_ext.disc_head(*inputs, labels, valid, emulated=backend == "emulated")[1]

    return [x, w, b], public, registered


CASES = {"attention": attention_case, "gen_head": gen_head_case, "disc_head": disc_head_case}


def leaves(inputs):
    return [t.detach().clone().requires_grad_() for t in inputs]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", CASES)
def test_eager_path_equals_registered_autograd(op, backend):
    inputs, public, registered = CASES[op](backend)
    public_inputs, registered_inputs = leaves(inputs), leaves(inputs)
    public_out, registered_out = public(public_inputs), registered(registered_inputs)
    assert torch.equal(public_out, registered_out)
    grad_out = torch.randn(public_out.shape, generator=torch.Generator().manual_seed(3)).to(public_out.dtype)
    public_grads = torch.autograd.grad(public_out, public_inputs, grad_out)
    registered_grads = torch.autograd.grad(registered_out, registered_inputs, grad_out)
    for name, public_grad, registered_grad in zip(("0", "1", "2"), public_grads, registered_grads):
        assert torch.any(registered_grad != 0), name
        assert torch.equal(public_grad, registered_grad), name


@pytest.mark.parametrize("op", CASES)
def test_eager_path_is_taken_with_gradients_only(op):
    inputs, public, registered = CASES[op](None)
    # The output's node is the Function's own: attention's op takes and returns [B, T, ...], no view in between.
    assert type(public(leaves(inputs)).grad_fn).__name__ == EAGER_NODE
    with torch.no_grad():
        out = public(leaves(inputs))
        assert out.grad_fn is None and not out.requires_grad
        assert torch.equal(out, registered(inputs))


@pytest.mark.parametrize("path", ["public", "registered"])
@pytest.mark.parametrize("op", CASES)
def test_second_derivative_raises(op, path):
    """The backward kernels have no derivative: a second backward through them must raise, not return a wrong
    (gradient-free) result."""
    inputs, public, registered = CASES[op](None)
    inputs = leaves(inputs)
    out = (public if path == "public" else registered)(inputs)
    grads = torch.autograd.grad(out.float().square().sum(), inputs, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        sum(g.float().sum() for g in grads).backward()


@pytest.mark.parametrize("path", ["public", "registered"])
@pytest.mark.parametrize("op", CASES)
def test_a_gradient_penalty_raises(op, path):
    """A gradient penalty: d loss / d inputs with create_graph=True for a loss linear in the op's output, so the
    incoming gradient is a constant. The gradients depend on the inputs all the same, and differentiating the
    penalty must raise (it came back as if they did not: the penalty's gradient was dropped)."""
    inputs, public, registered = CASES[op](None)
    inputs = leaves(inputs)
    out = (public if path == "public" else registered)(inputs)
    loss = (out.float() * torch.rand(out.shape, generator=torch.Generator().manual_seed(5))).sum()
    grads = torch.autograd.grad(loss, inputs, create_graph=True)
    assert all(g.requires_grad for g in grads)
    with pytest.raises(RuntimeError, match="differentiate twice.*backend='reference'"):
        (loss + sum(g.float().square().sum() for g in grads)).backward()
