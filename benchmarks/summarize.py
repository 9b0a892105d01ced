"""Turns a pytest-benchmark JSON from this folder's benchmarks into a Markdown table.

usage: python benchmarks/summarize.py bench.json [--markdown-out summary.md]

Prints the table; --markdown-out also writes it, under a header naming the card, driver, torch,
commit and date, to a file.
"""

import argparse
import json
import os
import subprocess
from pathlib import Path

BASELINE_PROVIDER = "reference"
COPY_PROVIDER = "copy"
COLUMNS = [
    "device", "shape", "mode", "provider", "ms / call", "GB/s", "% of copy",
    "speed-up vs reference", "peak MB above inputs",
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


def table_rows(benchmarks):
    cases = []
    for benchmark in benchmarks:
        info = benchmark["extra_info"]
        seconds = benchmark["stats"]["median"] / info["reps"]
        cases.append(dict(info, seconds=seconds, gbps=info["bytes"] / seconds / 1e9))
    copy_gbps = {case["device"]: case["gbps"] for case in cases if case["provider"] == COPY_PROVIDER}
    baseline_seconds = {
        (case["device"], case["shape"], case["mode"]): case["seconds"]
        for case in cases
        if case["provider"] == BASELINE_PROVIDER
    }
    for case in cases:
        baseline = baseline_seconds.get((case["device"], case["shape"], case["mode"]))
        peak_bytes = case.get("peak_bytes_above_inputs")
        yield [
            case["device"],
            case["shape"],
            case["mode"],
            case["provider"],
            f"{case['seconds'] * 1e3:.3f}",
            f"{case['gbps']:.1f}",
            f"{100 * case['gbps'] / copy_gbps[case['device']]:.0f}%" if case["device"] in copy_gbps else "-",
            f"{baseline / case['seconds']:.2f}x" if baseline else "-",
            f"{peak_bytes / 1e6:.1f}" if peak_bytes is not None else "-",
        ]


def markdown_table(rows):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def header(results):
    machine = results["machine_info"]
    if "cuda_device" in machine:
        card = f"{machine['cuda_device']} (driver {machine['nvidia_driver']}, CUDA {machine['cuda_runtime']})"
    else:
        card = f"CPU only: {machine['cpu'].get('brand_raw', machine['machine'])}, {machine['cpu']['count']} cores"
    return (
        "# disc_head benchmarks\n\n"
        f"- card: {card}\n"
        f"- torch: {machine.get('torch', 'unknown')}\n"
        f"- commit: {git_commit()}\n"
        f"- date: {results['datetime']}\n\n"
        "Times are medians per op call; GB/s counts the bytes one call must move "
        "(x read once forward, twice plus dx written for fwd_bwd); % of copy is against a "
        "device-to-device copy measured in the same run.\n\n"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("benchmark_json", type=Path)
    parser.add_argument("--markdown-out", type=Path, help="also write the table, with a header, here")
    args = parser.parse_args()
    results = json.loads(args.benchmark_json.read_text())
    if not results["benchmarks"]:
        raise SystemExit(f"{args.benchmark_json} holds no benchmarks (was the run --benchmark-disable?)")
    table = markdown_table(table_rows(results["benchmarks"]))
    print(table, end="")
    if args.markdown_out:
        args.markdown_out.write_text(header(results) + table)


if __name__ == "__main__":
    main()
