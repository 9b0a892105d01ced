"""ops.attention's CPU kernel (its packed-QKV form, as the encoder calls it, on one fused QKV projection's output)
against PyTorch's SDPA (CPU flash) as a transformers model calls it (q, k and v from separate projections, the
padding mask built once per batch), timed interleaved, and their peak memory.

    python benchmarks/cpu_attention_compare.py [--threads 2] [--rounds 5] [--repeats 5] [--memory [--memory-runs 3]]
        [--errors] [--dropout P] [--dtype float32|bfloat16]

Shape B=4, T=512, H=12, D=64, float32 unless --dtype says otherwise; "padded" gives lengths 512, 400, 300, 200
(SDPA then gets the boolean key mask, which rules out nothing on the CPU: its flash kernel takes masks).
--dropout P: both providers drop attention probabilities with probability P (ELECTRA trains with 0.1). Timing:
every round times each case for both providers back to back (best of --repeats calls each), so a busy neighbour
slows both alike; the table keeps each provider's best over the rounds and the median of the per-round ratios.

Memory (--memory): one fresh subprocess per (case, provider) so the allocators start empty; large allocations
are forced through mmap (MALLOC_MMAP_THRESHOLD_), so freed buffers leave the resident set and the process's
peak resident set (VmHWM, reset through /proc/self/clear_refs after one warm-up call) counts what one more call
holds at its peak, inputs excluded. The kernel updates those counters in batches, which leaves ~0.1-0.2 MB of
noise per process, so each cell is the median of --memory-runs processes.

Errors (--errors): each provider's output and gradients without padding or dropout against float64 attention on
the same (rounded) inputs, as the relative L2 error of the whole tensor and the max error over the max |value| (with
padding the two differ by design: SDPA's padded query rows are not zero and send gradient to the valid keys).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

B, T, H, D = 4, 512, 12, 64
LENGTHS = [512, 400, 300, 200]


def make_inputs(padded, dtype):
    generator = torch.Generator().manual_seed(0)
    # One fused projection output [B, T, 3, H, D], as the encoder produces.
    qkv = torch.randn(B, T, 3, H, D, dtype=dtype, generator=generator).requires_grad_()
    seqlens = torch.tensor(LENGTHS, dtype=torch.int32) if padded else None
    grad_out = torch.randn(B, T, H, D, dtype=dtype, generator=generator)
    return qkv, seqlens, grad_out


def ours(qkv, seqlens, dropout_p):
    """(attend, the leaves its gradients are taken for)."""
    from electra_ext import ops
    return (lambda: ops.attention_qkvpacked(qkv, seqlens=seqlens, dropout_p=dropout_p)), (qkv,)


def sdpa(qkv, seqlens, dropout_p):
    """(attend, leaves): q, k and v each their own leaf [B, T, H, D], so that their gradients are SDPA's own (views
    of one tensor would add the copy that stacks them)."""
    q, k, v = (t.detach().contiguous().requires_grad_() for t in qkv.unbind(2))
    mask = None
    if seqlens is not None:
        mask = (torch.arange(T) < seqlens.unsqueeze(1))[:, None, None, :]

    def attend():
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask,
                                             dropout_p=dropout_p)
        return out.transpose(1, 2)

    return attend, (q, k, v)


PROVIDERS = {"electra_ext": ours, "sdpa": sdpa}
CASES = [(mode, padded) for mode in ("fwd", "fwd_bwd") for padded in (False, True)]


def make_call(provider, mode, padded, dropout_p, dtype):
    qkv, seqlens, grad_out = make_inputs(padded, dtype)
    attend, leaves = PROVIDERS[provider](qkv, seqlens, dropout_p)
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return attend()
    else:
        def call():
            return torch.autograd.grad(attend(), leaves, grad_out)
    return call


def best_of(call, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def case_name(mode, padded):
    return f"{'forward' if mode == 'fwd' else 'forward + backward'}, {'padded' if padded else 'no padding'}"


def time_cases(rounds, repeats, dropout_p, dtype):
    calls = {(p, m, pad): make_call(p, m, pad, dropout_p, dtype) for p in PROVIDERS for m, pad in CASES}
    for call in calls.values():
        call()  # warm-up: JIT kernels, allocator
    times = {key: [] for key in calls}
    ratios = {case: [] for case in CASES}
    for _ in range(rounds):
        for mode, padded in CASES:
            t_ours = best_of(calls[("electra_ext", mode, padded)], repeats)
            t_sdpa = best_of(calls[("sdpa", mode, padded)], repeats)
            times[("electra_ext", mode, padded)].append(t_ours)
            times[("sdpa", mode, padded)].append(t_sdpa)
            ratios[(mode, padded)].append(t_ours / t_sdpa)
    print(f"| case | electra_ext | SDPA (CPU) | ratio (median of {rounds} rounds) |")
    print("| --- | --- | --- | --- |")
    for mode, padded in CASES:
        ours_ms, sdpa_ms = (1e3 * min(times[(p, mode, padded)]) for p in PROVIDERS)
        print(f"| {case_name(mode, padded)} | {ours_ms:.1f} ms | {sdpa_ms:.1f} ms "
              f"| {statistics.median(ratios[(mode, padded)]):.2f} |")


def status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure_memory_here(provider, mode, padded, dropout_p, dtype):
    call = make_call(provider, mode, padded, dropout_p, dtype)
    result = call()  # warm-up: JIT kernels, thread pools
    del result
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = status_kb("VmRSS")
    result = call()
    peak = status_kb("VmHWM")
    del result
    print(json.dumps({"peak_extra_kb": peak - before}))


def measure_memory(threads, dropout_p, dtype_name, runs):
    print(f"| case (median of {runs} processes) | electra_ext peak | SDPA peak |")
    print("| --- | --- | --- |")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    for mode, padded in CASES:
        peaks = {}
        for provider in PROVIDERS:
            kilobytes = []
            for _ in range(runs):
                output = subprocess.run(
                    [sys.executable, __file__, "--threads", str(threads), "--dropout", str(dropout_p), "--dtype",
                     dtype_name, "--child", provider, mode, str(int(padded))],
                    env=env, check=True, capture_output=True, text=True).stdout
                kilobytes.append(json.loads(output.strip().splitlines()[-1])["peak_extra_kb"])
            peaks[provider] = statistics.median(kilobytes) / 1024
        print(f"| {case_name(mode, padded)} | {peaks['electra_ext']:.1f} MB | {peaks['sdpa']:.1f} MB |")


def print_errors(dtype):
    qkv, _, grad_out = make_inputs(False, dtype)
    results = {}
    # ops.attention in float64 is its reference: the expected values.
    for name, make, inputs in [("float64", ours, qkv.detach().double().requires_grad_()),
                               *((p, make, qkv) for p, make in PROVIDERS.items())]:
        attend, leaves = make(inputs, None, 0.0)
        out = attend()
        grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
        results[name] = [out.detach(), *(grads[0].unbind(2) if len(grads) == 1 else grads)]
    print("| tensor | electra_ext: relative L2 error, max error | SDPA (CPU): relative L2 error, max error |")
    print("| --- | --- | --- |")
    for i, tensor in enumerate(("out", "dq", "dk", "dv")):
        expected = results["float64"][i]
        cells = []
        for provider in PROVIDERS:
            error = results[provider][i].double() - expected
            cells.append(f"{(error.norm() / expected.norm()).item():.2e}, "
                         f"{(error.abs().max() / expected.abs().max()).item():.2e}")
        print(f"| {tensor} | {' | '.join(cells)} |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--memory-runs", type=int, default=3, help="processes per memory cell (the median is kept)")
    parser.add_argument("--errors", action="store_true", help="errors against float64 attention, no padding")
    parser.add_argument("--dropout", type=float, default=0.0, help="attention dropout probability for both")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.child:
        provider, mode, padded = args.child
        measure_memory_here(provider, mode, bool(int(padded)), args.dropout, dtype)
        return
    print(f"B={B}, T={T}, H={H}, D={D}, {args.dtype}, dropout {args.dropout}, {args.threads} threads, "
          f"torch {torch.__version__}")
    time_cases(args.rounds, args.repeats, args.dropout, dtype)
    if args.memory:
        measure_memory(args.threads, args.dropout, args.dtype, args.memory_runs)
    if args.errors:
        print_errors(dtype)


if __name__ == "__main__":
    main()
