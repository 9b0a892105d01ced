"""Turns pytest-benchmark JSONs from this folder's benchmarks into Markdown tables.

usage: python benchmarks/summarize.py bench.json [more.json ...] [--markdown-out summary.md] [--json-out all.json]

Prints the tables of every file's cases together; --markdown-out also writes them, under a header naming the
card, driver, torch, commit and date (the first file's), to a file; --json-out writes the files' cases as one
pytest-benchmark JSON.
"""

import argparse
import json
import os
import subprocess
from pathlib import Path

COPY_PROVIDER = "copy"
MATMUL_PROVIDER = "matmul"
STEP_OP, STEP_BASELINE, STEP_COMPILED_BASELINE = "pretraining_step", "hf_sdpa", "hf_compiled"


class Table:
    """How one op's cases are tabulated: the throughput column and the providers the speed-ups are against (the
    fastest of them in each device, shape and mode)."""

    def __init__(self, op, baseline, baselines, throughput_column, throughput, note):
        self.op, self.baseline, self.baselines, self.note = op, baseline, baselines, note
        self.throughput_column, self.throughput = throughput_column, throughput

    def columns(self):
        return ["device", "shape", "mode", "provider", "ms / call", *self.throughput_column,
                f"speed-up vs {self.baseline}", "peak MB above inputs"]


def gbps(case, copy_gbps):
    rate = case["bytes"] / case["seconds"] / 1e9
    copy = copy_gbps.get(case["device"])
    return [f"{rate:.1f}", f"{100 * rate / copy:.0f}%" if copy else "-"]


def tflops(case, copy_gbps):
    rate = case["flops"] / case["seconds"] / 1e12
    return [f"{rate:.1f}" if rate >= 10 else f"{rate:.3g}"]  # 3 digits for the CPU's and small shapes' rates


SDPA_PROVIDERS = ("sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-varlen")

TABLES = [
    Table("disc_head", "reference", ("reference",), ["GB/s", "% of copy"], gbps,
          "GB/s counts the bytes one call must move (x read once forward, twice plus dx written for fwd_bwd); "
          "% of copy is against a device-to-device copy measured in the same run."),
    Table("attention", "best sdpa", SDPA_PROVIDERS, ["TFLOP/s"], tflops,
          "TFLOP/s counts 4 H D sum(len^2) per forward on valid tokens, 2.5x that per backward; sdpa is "
          "torch.nn.functional.scaled_dot_product_attention as it dispatches (with a boolean key mask when "
          "padded), sdpa-flash, -efficient and -cudnn the same forced to one backend, sdpa-varlen on nested "
          "tensors of the valid tokens; the speed-ups are against the fastest of these."),
    Table("gen_head", "eager", ("eager",), ["TFLOP/s"], tflops,
          "TFLOP/s counts 2 M V E per GEMM pass, one forward, three for fwd_bwd; eager is the PyTorch head in "
          "the inputs' dtype (F.linear, cross_entropy in float32, Gumbel argmax with torch's RNG on the [M, V] "
          "logits); reference is the ops' float32 oracle (its Philox noise in PyTorch ops); liger is "
          "Liger-Kernel's fused linear cross-entropy (loss only, no sample)."),
]


def git_commit():
    """$ELECTRA_EXT_COMMIT when set (a copy of the tree without .git), else the short HEAD of this checkout."""
    if os.environ.get("ELECTRA_EXT_COMMIT"):
        return os.environ["ELECTRA_EXT_COMMIT"]
    try:
        command = ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cases_of(benchmarks):
    for benchmark in benchmarks:
        info = benchmark["extra_info"]
        yield dict(info, op=info.get("op", "disc_head"), seconds=benchmark["stats"]["median"] / info["reps"])


def table_rows(table, cases, copy_gbps):
    baseline_seconds = {}
    for case in cases:
        if case["provider"] in table.baselines:
            key = (case["device"], case["shape"], case["mode"])
            baseline_seconds[key] = min(case["seconds"], baseline_seconds.get(key, case["seconds"]))
    for case in cases:
        baseline = baseline_seconds.get((case["device"], case["shape"], case["mode"]))
        peak_bytes = case.get("peak_bytes_above_inputs")
        yield [
            case["device"],
            case["shape"],
            case["mode"],
            case["provider"],
            f"{case['seconds'] * 1e3:.3f}",
            *table.throughput(case, copy_gbps),
            f"{baseline / case['seconds']:.2f}x" if baseline else "-",
            f"{peak_bytes / 1e6:.1f}" if peak_bytes is not None else "-",
        ]


def markdown_tables(benchmarks):
    cases = list(cases_of(benchmarks))
    copy_gbps = {
        case["device"]: case["bytes"] / case["seconds"] / 1e9 for case in cases if case["provider"] == COPY_PROVIDER
    }
    sections = []
    for table in TABLES:
        rows = list(table_rows(table, [c for c in cases if c["op"] == table.op and c["provider"] != COPY_PROVIDER],
                                copy_gbps))
        if not rows:
            continue
        columns = table.columns()
        lines = [f"## {table.op}", "", table.note, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        sections.append("\n".join(lines) + "\n")
    if copy_gbps:
        sections.append("Measured device-to-device copy: " +
                        ", ".join(f"{device} {rate:.0f} GB/s" for device, rate in copy_gbps.items()) + "\n")
    steps = step_table(cases)
    if steps:
        sections.append(steps)
    return "\n".join(sections)


def step_table(cases):
    """The training-step benchmark: one row per provider, speed and memory against HF with SDPA at the same
    device, shape and mode, MFU against the card's datasheet peak and against the matrix-product rate measured
    in the same run."""
    matmul_flops = {case["device"]: case["flops"] / case["seconds"] for case in cases
                    if case["op"] == STEP_OP and case["provider"] == MATMUL_PROVIDER}
    # By device, the step mode first, then shape; providers stay in the run's order (a stable sort).
    steps = sorted((case for case in cases if case["op"] == STEP_OP and case["provider"] != MATMUL_PROVIDER),
                   key=lambda case: (case["device"], case["mode"] != "step", case["shape"]))
    if not steps:
        return ""
    baselines, compiled_baselines = ({(c["device"], c["shape"], c["mode"]): c for c in steps if c["provider"] == name}
                                     for name in (STEP_BASELINE, STEP_COMPILED_BASELINE))
    columns = ["device", "shape", "mode", "provider", "batch", "ms / step", "tokens/s", "MFU", "of matmul rate",
               "peak GB", f"tokens/s vs {STEP_BASELINE}", f"tokens/s vs {STEP_COMPILED_BASELINE}",
               f"peak memory vs {STEP_BASELINE}"]
    lines = ["## pretraining_step", "",
             "One full training step (masking, generator, sampling, discriminator, backward, AdamW step). MFU is "
             "model FLOPs (benchmarks/model_flops.py) per second over the card's datasheet dense bf16 peak "
             "(PaLM's definition; none on the CPU); of matmul rate, the same over the bf16 (CPU: fp32) "
             "matrix-product rate measured in the same run, which is below the peak; peak GB is the step's whole "
             "peak allocation (parameters, optimizer state, activations); mode largest_batch is the largest batch "
             "within the run's memory budget.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for case in steps:
        tokens_per_second = case["tokens"] / case["seconds"]
        rate, datasheet = matmul_flops.get(case["device"]), case.get("peak_flops")
        peak = case.get("peak_bytes")
        key = (case["device"], case["shape"], case["mode"])
        baseline, compiled_baseline = baselines.get(key), compiled_baselines.get(key)
        speed_up = compiled_speed_up = memory = "-"
        if baseline:
            speed_up = f"{tokens_per_second / (baseline['tokens'] / baseline['seconds']):.2f}x"
            if peak is not None and baseline.get("peak_bytes"):
                memory = f"{peak / baseline['peak_bytes']:.2f}x"
        if compiled_baseline:
            compiled_rate = compiled_baseline["tokens"] / compiled_baseline["seconds"]
            compiled_speed_up = f"{tokens_per_second / compiled_rate:.2f}x"
        lines.append("| " + " | ".join([
            case["device"], f"{case['preset']} {case['seq_len']}", case["mode"], case["provider"], str(case["batch"]),
            f"{case['seconds'] * 1e3:.1f}", f"{tokens_per_second:,.0f}",
            f"{100 * case['flops'] / case['seconds'] / datasheet:.1f}%" if datasheet else "-",
            f"{100 * case['flops'] / case['seconds'] / rate:.1f}%" if rate else "-",
            f"{peak / 1e9:.2f}" if peak is not None else "-", speed_up, compiled_speed_up, memory]) + " |")
    if matmul_flops:
        lines += ["", "Measured matrix-product rate: " +
                  ", ".join(f"{device} {rate / 1e12:.1f} TFLOP/s" for device, rate in matmul_flops.items())]
    return "\n".join(lines) + "\n"


def header(results):
    machine = results["machine_info"]
    if "cuda_device" in machine:
        card = f"{machine['cuda_device']} (driver {machine['nvidia_driver']}, CUDA {machine['cuda_runtime']})"
    else:
        card = f"CPU only: {machine['cpu'].get('brand_raw', machine['machine'])}, {machine['cpu']['count']} cores"
    return (
        "# Benchmarks\n\n"
        f"- card: {card}\n"
        f"- torch: {machine.get('torch', 'unknown')}\n"
        f"- commit: {git_commit()}\n"
        f"- date: {results['datetime']}\n\n"
        "Times are medians per op call.\n\n"
    )


def merged_results(paths):
    """The first file's run facts with every file's benchmarks."""
    results = [json.loads(path.read_text()) for path in paths]
    return dict(results[0], benchmarks=[case for result in results for case in result["benchmarks"]])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("benchmark_json", type=Path, nargs="+")
    parser.add_argument("--markdown-out", type=Path, help="also write the tables, with a header, here")
    parser.add_argument("--json-out", type=Path, help="also write the files' cases as one JSON here")
    args = parser.parse_args()
    results = merged_results(args.benchmark_json)
    if not results["benchmarks"]:
        raise SystemExit(f"{', '.join(map(str, args.benchmark_json))} hold no benchmarks (was the run "
                         "--benchmark-disable?)")
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=1))
    table = markdown_tables(results["benchmarks"])
    print(table, end="")
    if args.markdown_out:
        args.markdown_out.write_text(header(results) + table)


if __name__ == "__main__":
    main()
