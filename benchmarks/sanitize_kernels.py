"""Runs every CUDA kernel of electra_ext once, forward and backward, on small shapes that reach their edge cases
(ragged tiles, padding and empty sequences, one row, strided inputs, dropout, several backward chunks), for
NVIDIA's compute-sanitizer: benchmarks/gpu_check.sh runs it under `--tool memcheck` and `--tool racecheck`
(ELECTRA_EXT_GPU_CHECK_SANITIZE=1). Exits non-zero if a result is not finite; the sanitizer's own exit code
reports its findings.

usage: compute-sanitizer --tool memcheck --error-exitcode 1 python3 benchmarks/sanitize_kernels.py
"""
import os

import torch

from electra_ext import ops


def finite(name, *tensors):
    for t in tensors:
        if not torch.isfinite(t.float()).all():
            raise SystemExit(f"sanitize_kernels: {name} gave a non-finite result")


def disc_head(device, dtype):
    for rows, hidden in [(1, 64), (67, 37), (300, 256)]:
        x = torch.randn(2 * rows, hidden, device=device, dtype=dtype)[::2].requires_grad_()  # strided rows
        w = torch.randn(hidden, device=device, requires_grad=True)
        b = torch.randn(1, device=device, requires_grad=True)
        labels = torch.rand(rows, device=device) < 0.15
        valid = torch.rand(rows, device=device) < 0.8
        logits, loss = ops.disc_head(x, w, b, labels, valid)
        finite("disc_head", logits, loss, *torch.autograd.grad(loss + logits.sum(), (x, w, b)))


def attention(device, dtype):
    for head_dim in (32, 64, 128):
        for seq_len, lengths, dropout_p in [(70, [70, 1, 0], 0.0), (130, [129, 64, 65], 0.1)]:
            qkv = torch.randn(len(lengths), seq_len, 3, 2, head_dim, device=device, dtype=dtype, requires_grad=True)
            seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
            # q, k, v read in place from the packed tensor (token stride 3 H D) and from three separate ones (H D).
            for out in (ops.attention_qkvpacked(qkv, seqlens=seqlens, dropout_p=dropout_p),
                        ops.attention(*(t.contiguous() for t in qkv.unbind(2)), seqlens=seqlens, dropout_p=dropout_p)):
                finite("attention", out, *torch.autograd.grad(out.float().square().sum(), qkv))


def gen_head(device, dtype):
    # A 1 MiB backward workspace: 300 rows at V = 1000 take three chunks of 128 rows.
    os.environ["ELECTRA_EXT_GEN_HEAD_WORKSPACE_MIB"] = "0"
    for rows, vocab, hidden in [(1, 50, 64), (300, 1000, 40), (77, 30522, 128)]:
        h = torch.randn(rows, 2 * hidden, device=device, dtype=dtype)[:, ::2].requires_grad_()
        weight = (torch.randn(vocab, hidden, device=device) / hidden**0.5).to(dtype).requires_grad_()
        bias = torch.zeros(vocab, device=device, dtype=dtype, requires_grad=True)
        targets = torch.randint(0, vocab, (rows,), device=device)
        targets[::3] = -100
        out = ops.gen_head(h, weight, bias, targets, disallow_correct=True)
        finite("gen_head", out.loss, out.lse, *torch.autograd.grad(out.loss, (h, weight, bias)))
    del os.environ["ELECTRA_EXT_GEN_HEAD_WORKSPACE_MIB"]


def main():
    if not torch.cuda.is_available():
        raise SystemExit("sanitize_kernels: needs a CUDA device")
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for run in (disc_head, attention, gen_head):
            run("cuda", dtype)
    torch.cuda.synchronize()
    print("sanitize_kernels: every CUDA kernel ran")


if __name__ == "__main__":
    main()
