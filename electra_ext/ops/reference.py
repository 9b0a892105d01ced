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
