"""ops.gen_head (reference-backed until the fused kernel of issue 7): loss and log-sum-exp against PyTorch's
cross-entropy, ignored rows, M = 0, the Gumbel-max sampler against the softmax (chi-square), temperature,
disallow_correct, and input checks."""
import pytest
import torch
import torch.nn.functional as F

from electra_ext.ops import gen_head

V, E = 1000, 32  # V is no multiple of a power-of-two tile


def inputs(rows, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, E, generator=generator, dtype=dtype, requires_grad=True)
    weight = (0.3 * torch.randn(V, E, generator=generator, dtype=dtype)).requires_grad_()
    bias = (0.1 * torch.randn(V, generator=generator, dtype=dtype)).requires_grad_()
    targets = torch.randint(0, V, (rows,), generator=generator)
    return h, weight, bias, targets


@pytest.mark.parametrize("rows", [1, 7, 130])
def test_loss_lse_and_gradients_match_cross_entropy(rows):
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


@pytest.mark.parametrize("rows", [0, 4])
def test_no_counted_row_gives_zero_loss_and_zero_gradients(rows):
    h, weight, bias, targets = inputs(rows)
    targets[:] = -100
    out = gen_head(h, weight, bias, targets)
    assert out.loss.item() == 0.0 and out.num_correct.item() == 0 and out.samples.shape == (rows,)
    out.loss.backward()
    assert not h.grad.any() and not weight.grad.any() and not bias.grad.any()


def chi_square(counts, probabilities):
    expected = probabilities * counts.sum()
    return ((counts - expected) ** 2 / expected).sum().item()


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_samples_follow_the_softmax(temperature):
    # One row repeated: every sample is a draw from softmax(logits / T) over 8 tokens.
    vocab, draws = 8, 40_000
    generator = torch.Generator().manual_seed(1)
    h = torch.randn(1, 4, generator=generator).expand(draws, 4)
    weight = torch.randn(vocab, 4, generator=generator)
    bias = torch.zeros(vocab)
    out = gen_head(h, weight, bias, torch.zeros(draws, dtype=torch.long), temperature=temperature,
                   generator=torch.Generator().manual_seed(2))
    probabilities = torch.softmax((h[0] @ weight.t()) / temperature, -1)
    counts = torch.bincount(out.samples, minlength=vocab).double()
    # 7 degrees of freedom: 24.3 is the 0.1% tail.
    assert chi_square(counts, probabilities.double()) < 24.3


def test_disallow_correct_never_draws_the_target_and_seed_reproduces():
    h, weight, bias, targets = inputs(500)
    targets[:] = 7
    with torch.no_grad():
        bias[7] += 30.0  # the target would be drawn almost always
    out = gen_head(h, weight, bias, targets, disallow_correct=True, generator=torch.Generator().manual_seed(3))
    assert not (out.samples == targets).any()
    again = gen_head(h, weight, bias, targets, disallow_correct=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out.samples, again.samples)
    plain = gen_head(h, weight, bias, targets, generator=torch.Generator().manual_seed(3))
    assert (plain.samples == targets).float().mean() > 0.9


BAD = [
    (dict(h=torch.randn(3, E + 1)), ValueError, "h must be \\[M, E\\] and weight \\[V, E\\] with the same E"),
    (dict(bias=torch.randn(V + 1)), ValueError, "bias must be \\[V=1000\\]"),
    (dict(targets=torch.zeros(3, dtype=torch.int32)), ValueError, "targets must be int64 of shape \\[M=3\\]"),
    (dict(targets=torch.zeros(2, dtype=torch.long)), ValueError, "targets must be int64 of shape \\[M=3\\]"),
    (dict(temperature=0.0), ValueError, "temperature must be a positive number"),
    (dict(h=torch.zeros(3, E, dtype=torch.long)), TypeError, "must be floating point"),
]


@pytest.mark.parametrize("changes,error,message", BAD)
def test_bad_inputs_name_the_argument(changes, error, message):
    h, weight, bias, targets = inputs(3)
    arguments = dict(h=h, weight=weight, bias=bias, targets=targets)
    temperature = changes.pop("temperature", 1.0)
    arguments.update(changes)
    with pytest.raises(error, match=message):
        gen_head(**arguments, temperature=temperature)
