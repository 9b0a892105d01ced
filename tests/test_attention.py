"""ops.attention (reference-backed until the fused kernel of issue 6): its contract against PyTorch's SDPA,
padding semantics, dropout rate and input checks."""
import pytest
import torch
import torch.nn.functional as F

from electra_ext.ops import attention


def sdpa_with_padding(q, k, v, seqlens):
    """PyTorch's own attention per sequence on its valid prefix, zeros after it."""
    out = torch.zeros_like(q)
    for row, length in enumerate(seqlens.tolist()):
        if length:
            qs, ks, vs = (t[row:row + 1, :length].transpose(1, 2) for t in (q, k, v))
            out[row, :length] = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2)[0]
    return out


@pytest.mark.parametrize("seq_len,head_dim", [(1, 64), (37, 64), (130, 32), (65, 128)])
def test_matches_sdpa_on_valid_tokens_and_zeros_padding(seq_len, head_dim):
    generator = torch.Generator().manual_seed(seq_len)
    q, k, v = torch.randn(3, 4, seq_len, 2, head_dim, generator=generator, dtype=torch.float64).unbind(0)
    # Full, about half, one token, and all padding (seqlens 0).
    seqlens = torch.tensor([seq_len, (seq_len + 1) // 2, 1, 0], dtype=torch.int32)
    out = attention(q, k, v, seqlens=seqlens)
    expected = sdpa_with_padding(q, k, v, seqlens)
    assert out.dtype == torch.float64
    assert torch.allclose(out, expected, atol=1e-12)


def test_no_seqlens_means_no_padding_and_strided_views_work():
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 19, 3, 4, 16, generator=generator)
    q, k, v = qkv.unbind(2)  # strided views of a fused projection
    assert not q.is_contiguous()
    expected = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert torch.allclose(attention(q, k, v), expected, atol=1e-6)
    assert torch.allclose(attention(q, k, v, softmax_scale=0.5),
                          F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                                         scale=0.5).transpose(1, 2), atol=1e-6)


def test_dropout_rate_and_seeded_reproducibility():
    # Equal scores and v = 1: each output element is the sum of the kept probabilities (1/256 each) / 0.7.
    q = torch.zeros(1, 256, 1, 8)
    k = torch.zeros(1, 256, 1, 8)
    v = torch.ones(1, 256, 1, 8)
    out = attention(q, k, v, dropout_p=0.3, generator=torch.Generator().manual_seed(1))
    kept_fraction = out[0, :, 0, 0].mean().item() * 0.7
    assert abs(kept_fraction - 0.7) < 0.01
    again = attention(q, k, v, dropout_p=0.3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_gradients_flow_to_q_k_v():
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 9, 2, 8, dtype=torch.float64, generator=generator, requires_grad=True)
               for _ in range(3))
    seqlens = torch.tensor([9, 4])
    assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, seqlens=seqlens), (q, k, v))


BAD = [
    (lambda q: (q[0], q, q), {}, ValueError, "q must be \\[batch, seq, heads, head_dim\\]"),
    (lambda q: (q, q[:, :3], q), {}, ValueError, "k and v must have q's shape"),
    (lambda q: (q, q.double(), q), {}, TypeError, "share one floating dtype"),
    (lambda q: (q, q, q), {"seqlens": torch.tensor([1.0, 2.0])}, ValueError, "seqlens must be an int32/int64"),
    (lambda q: (q, q, q), {"seqlens": torch.tensor([1])}, ValueError, "seqlens must be an int32/int64 tensor of shape \\[2\\]"),
    (lambda q: (q, q, q), {"dropout_p": 1.0}, ValueError, "dropout_p must be in \\[0, 1\\)"),
    (lambda q: (q, q, q), {"softmax_scale": -1.0}, ValueError, "softmax_scale must be a positive number"),
]


@pytest.mark.parametrize("make,kwargs,error,message", BAD)
def test_bad_inputs_name_the_argument(make, kwargs, error, message):
    q = torch.randn(2, 5, 2, 8)
    with pytest.raises(error, match=message):
        attention(*make(q), **kwargs)
