"""Where the time of one attention forward + backward goes on a GPU: the top CUDA kernels by total time.

usage: python benchmarks/profile_attention.py [--shape base|small] [--padding 0.15] [--dropout 0.1] [--deterministic]
       [--steps N] [--no-torch-profiler]

--deterministic: under torch.use_deterministic_algorithms(True), the backward's dQ kernel (S and dP recomputed)
instead of dQ added over key blocks with atomics. With ELECTRA_EXT_WGMMA=0 in the environment, a build with sm_90a
code runs the mma.sync kernels on an H100/H200 instead of the wgmma ones (the header line says which).
--no-torch-profiler: only run the steps, for a profiler outside (Nsight Compute, which cannot share CUPTI with
torch.profiler); 3 untimed steps come first, each one forward and one dK/dV kernel launch.
"""
import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile

from electra_ext import BUILD_INFO, ops

SHAPES = {"small": (128, 128, 4, 64), "base": (32, 512, 12, 64)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="base")
    parser.add_argument("--padding", type=float, default=0.0, help="mean padded fraction of each sequence")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--no-torch-profiler", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_attention.py needs a CUDA device")
    torch.use_deterministic_algorithms(args.deterministic)
    torch.utils.deterministic.fill_uninitialized_memory = False  # no NaN fill kernels in the profile
    batch, seq_len, heads, head_dim = SHAPES[args.shape]
    qkv = torch.randn(batch, seq_len, 3, heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    fraction = torch.linspace(1.0 - 2 * args.padding, 1.0, batch, device="cuda")
    seqlens = (fraction * seq_len).round().to(torch.int32)
    grad_out = torch.randn(batch, seq_len, heads, head_dim, device="cuda", dtype=torch.bfloat16)

    def step():
        out = ops.attention_qkvpacked(qkv, seqlens=seqlens, dropout_p=args.dropout)
        return torch.autograd.grad(out, qkv, grad_out)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    if args.no_torch_profiler:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        return
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    print(f"{args.shape}, padding {args.padding}, dropout {args.dropout}, deterministic {args.deterministic}, "
          f"sm_90a build {BUILD_INFO.WITH_SM90A}, ELECTRA_EXT_WGMMA={os.environ.get('ELECTRA_EXT_WGMMA', '1')}: "
          f"{args.steps} forward + backward steps")
    print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
