"""Pure-PyTorch references of every electra_ext op: the fallback where no kernel exists, the oracle in
tests and the baseline in benchmarks. They compute in float32 (float64 when given float64 inputs)."""
import torch
import torch.nn.functional as F


def disc_head_reference(x, w, b, labels, valid):
    """logits = gelu_erf(x) @ w + b per row; loss = mean BCE-with-logits over rows where `valid`."""
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    logits = F.gelu(x.to(compute_dtype)) @ w.to(compute_dtype) + b.to(compute_dtype)
    per_row = F.binary_cross_entropy_with_logits(logits, labels.to(compute_dtype), reduction="none")
    mask = valid.to(compute_dtype)
    # Mean over valid rows, 0 (with zero gradients) when there are none.
    loss = (per_row * mask).sum() / mask.sum().clamp_min(1)
    return logits, loss


def generator_kwargs(generator):
    """`generator=` for torch.rand & co. only when one is given: the overload that takes a generator rejects
    the symbolic sizes of a dynamic-shape torch.compile graph, even with generator=None."""
    return {} if generator is None else {"generator": generator}


def philox_seed(device, generator):
    """int64 [1] on `device`: the Philox key of one call's random draws (attention dropout, gen_head's Gumbel
    noise), drawn from `generator` (torch's default generator for the device when None)."""
    return torch.randint(-2**63, 2**63 - 1, (1,), dtype=torch.int64, device=device, **generator_kwargs(generator))


def _compute_dtype(tensor):
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def key_padding_mask(seqlens, seq_len):
    """[B, T] bool, True at the first seqlens[b] positions of row b (padding sits at the end)."""
    return torch.arange(seq_len, device=seqlens.device) < seqlens.to(torch.int64).unsqueeze(1)


_UINT32 = 0xFFFFFFFF


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Random123's constants) on int64 tensors holding uint32 values; returns the four output
    words. The same function as csrc/common/philox.h, which the kernels use."""
    for _ in range(10):
        product0 = c0 * 0xD2511F53  # < 2^64: wraps in int64, but its bit pattern is the unsigned product
        product1 = c2 * 0xCD9E8D57
        high0, low0 = (product0 >> 32) & _UINT32, product0 & _UINT32
        high1, low1 = (product1 >> 32) & _UINT32, product1 & _UINT32
        c0, c1, c2, c3 = high1 ^ c1 ^ k0, low1, high0 ^ c3 ^ k1, low0
        k0 = (k0 + 0x9E3779B9) & _UINT32
        k1 = (k1 + 0xBB67AE85) & _UINT32
    return c0, c1, c2, c3


def dropout_threshold(dropout_p):
    """round(256 p) of p rounded to float32, as the kernels compute it: entries whose byte is below it are
    dropped (0: no dropout)."""
    return int(float(torch.tensor(dropout_p, dtype=torch.float32)) * 256.0 + 0.5)


def dropout_scale(dropout_p):
    """256 / (256 - threshold): the scale of kept attention probabilities, 1 / the exact keep probability."""
    return 256.0 / (256 - dropout_threshold(dropout_p))


def attention_dropout_draws(seed, batch, heads, seq_len, device):
    """[batch, heads, seq_len, seq_len] uint8: the byte attention dropout draws per (seed, batch, head, row,
    column), as in csrc/common/philox.h: the Philox call of counter (column / 16, row, head, batch) gives 16
    bytes and column c takes byte c % 16 (little-endian within the four words). seed: int64 tensor, one element."""
    seed = seed.reshape(()).to(device=device, dtype=torch.int64)
    k0, k1 = seed & _UINT32, (seed >> 32) & _UINT32
    chunks = (seq_len + 15) // 16
    b, h, row, chunk = torch.meshgrid(*(torch.arange(n, device=device, dtype=torch.int64)
                                        for n in (batch, heads, seq_len, chunks)), indexing="ij")
    words = torch.stack(philox4x32_10(chunk, row, h, b, k0, k1), dim=-1)  # [B, H, T, chunks, 4]
    shifts = torch.arange(0, 32, 8, device=device, dtype=torch.int64)
    draws = ((words.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8)  # [B, H, T, chunks, 4 words, 4 bytes]
    return draws.reshape(batch, heads, seq_len, chunks * 16)[..., :seq_len]


def attention_dropout_keep(seed, batch, heads, seq_len, dropout_p, device):
    """[batch, heads, seq_len, seq_len] bool: which attention probabilities dropout keeps, those whose byte
    (attention_dropout_draws) is >= dropout_threshold(p)."""
    return attention_dropout_draws(seed, batch, heads, seq_len, device) >= dropout_threshold(dropout_p)


def attention_reference(q, k, v, seqlens, dropout_p, softmax_scale, seed):
    """softmax(q kᵀ · scale, padded keys excluded) v per (batch, head), padded query rows zero.

    q, k, v: [B, T, H, D]; seqlens: [B] or None (no padding). Dropout on the attention probabilities keeps
    entry (b, h, i, j) where attention_dropout_keep says so (seed: int64 tensor, the kernels' key) and scales
    the kept ones by dropout_scale(p) (1 / (1 - p) with p rounded to a multiple of 1/256). Returns [B, T, H, D]
    in q's dtype."""
    compute_dtype = _compute_dtype(q)
    qh, kh, vh = (t.to(compute_dtype).transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * softmax_scale
    if seqlens is not None:
        valid = key_padding_mask(seqlens, q.shape[1])
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probabilities = torch.softmax(scores, dim=-1)
    if seqlens is not None:
        # Rows with no valid key (seqlens 0) and padded query rows: zeros, not NaN.
        probabilities = probabilities.masked_fill(~(valid[:, None, :, None] & valid[:, None, None, :]), 0.0)
    if dropout_p > 0.0:
        keep = attention_dropout_keep(seed, q.shape[0], q.shape[2], q.shape[1], dropout_p, q.device)
        probabilities = probabilities * keep * dropout_scale(dropout_p)
    return torch.matmul(probabilities, vh).transpose(1, 2).to(q.dtype)


GEN_HEAD_STREAM = (0xFFFFFFFF, 0x67656E68)  # Philox counter words c2, c3 of the generator head's noise
_GUMBEL_ROW_BLOCK = 1024  # rows of Philox words at a time: ~16 bytes of int64 temporaries per logit, not per row


def gen_head_gumbel(seed, rows, vocab, device):
    """[rows, vocab] float32 Gumbel noise -log(-log(u)) keyed by (seed, row, column) as in csrc/common/philox.h:
    u = ((word >> 9) + 0.5) * 2^-23 from Philox word column % 4 of counter (column / 4, row, GEN_HEAD_STREAM)."""
    seed = seed.reshape(()).to(device=device, dtype=torch.int64)
    k0, k1 = seed & _UINT32, (seed >> 32) & _UINT32
    groups = (vocab + 3) // 4
    noise = torch.empty(rows, vocab, dtype=torch.float32, device=device)
    group = torch.arange(groups, device=device, dtype=torch.int64)
    for first in range(0, rows, _GUMBEL_ROW_BLOCK):
        row = torch.arange(first, min(rows, first + _GUMBEL_ROW_BLOCK), device=device, dtype=torch.int64)
        c0, c1 = torch.broadcast_tensors(group.unsqueeze(0), row.unsqueeze(1))
        c2, c3 = (torch.full_like(c0, word) for word in GEN_HEAD_STREAM)
        words = torch.stack(philox4x32_10(c0, c1, c2, c3, k0, k1), dim=-1).reshape(row.numel(), groups * 4)
        # Every step exact in float32 but the logs, which are the kernels' own (ATen's on the CPU).
        uniform = ((words[:, :vocab] >> 9).to(torch.float32) + 0.5) * 2.0**-23
        noise[first:first + row.numel()] = -torch.log(-torch.log(uniform))
    return noise


def gen_head_reference(h, weight, bias, targets, temperature, seed, disallow_correct, ignore_index):
    """Generator head on the rows of h: logits = h weightᵀ + bias, mean cross-entropy over rows whose target
    is not ignore_index (0 when there are none), Gumbel-max samples argmax(logits / temperature + gumbel) with
    the noise of gen_head_gumbel (seed: int64 tensor with one element), the target column excluded on counted
    rows when disallow_correct, ties to the lowest column.

    The sampling scores are float32 on every path, logits rounded to float32 first (float64 inputs too), then
    times float32(1 / temperature), then plus the noise, two roundings, as the kernels compute them: with float32
    inputs the CPU kernel draws the same tokens.

    Returns (loss, samples [M] int64, lse [M] float32/64, num_correct int64 scalar); only the loss carries
    gradient."""
    compute_dtype = _compute_dtype(h)
    logits = h.to(compute_dtype) @ weight.to(compute_dtype).t() + bias.to(compute_dtype)
    lse = torch.logsumexp(logits, dim=-1)
    counted = targets != ignore_index
    safe_targets = torch.where(counted, targets, torch.zeros_like(targets))
    target_logits = logits.gather(1, safe_targets.unsqueeze(1)).squeeze(1)
    per_row = (lse - target_logits) * counted
    loss = per_row.sum() / counted.sum().clamp_min(1)
    with torch.no_grad():
        detached = logits.detach()
        num_correct = ((detached.argmax(dim=-1) == targets) & counted).sum()
        gumbel = gen_head_gumbel(seed, h.shape[0], weight.shape[0], h.device)
        scores = detached.to(torch.float32) * (1.0 / temperature) + gumbel
        if disallow_correct:
            columns = torch.arange(weight.shape[0], device=h.device)
            scores = scores.masked_fill((columns == targets.unsqueeze(1)) & counted.unsqueeze(1), float("-inf"))
        samples = scores.argmax(dim=-1)
    return loss, samples, lse.detach(), num_correct
