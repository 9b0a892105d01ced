"""Draws the training-step benchmark's speed-ups as a bar chart: tokens/s of each provider over HF transformers'
eager step with SDPA, per shape, from a pytest-benchmark JSON of test_pretraining_step_bench.py.

usage: python benchmarks/plot_speedups.py bench.json speedups.png [--mode step|largest_batch]

Every bar is labelled with the number it shows, and the title names the card and the JSON, so the PNG shows
nothing that is not in that results file.
"""
import argparse
import json
from pathlib import Path

from summarize import STEP_BASELINE, STEP_OP, cases_of


def speed_ups(benchmarks, mode):
    """{shape label: {provider: tokens/s over the baseline's}} for one device (CUDA when the run has it)."""
    cases = [c for c in cases_of(benchmarks) if c["op"] == STEP_OP and c["mode"] == mode]
    device = "cuda" if any(c["device"] == "cuda" for c in cases) else "cpu"
    rates = {}
    for case in cases:
        if case["device"] == device:
            rates.setdefault(f"{case['preset']} {case['seq_len']}, batch {case['batch']}"
                             if mode == "step" else case["preset"], {})[case["provider"]] = \
                case["tokens"] / case["seconds"]
    return device, {shape: {provider: rate / by_provider[STEP_BASELINE] for provider, rate in by_provider.items()}
                    for shape, by_provider in rates.items() if STEP_BASELINE in by_provider}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("benchmark_json", type=Path)
    parser.add_argument("png", type=Path)
    parser.add_argument("--mode", default="step", choices=("step", "largest_batch"))
    args = parser.parse_args()
    results = json.loads(args.benchmark_json.read_text())
    device, ratios = speed_ups(results["benchmarks"], args.mode)
    if not ratios:
        raise SystemExit(f"{args.benchmark_json} holds no {STEP_OP} {args.mode} cases with the {STEP_BASELINE} "
                         f"baseline (was the run --benchmark-disable?)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    providers = list(dict.fromkeys(p for by_provider in ratios.values() for p in by_provider))  # the run's order
    width = 0.8 / len(providers)
    figure, axis = plt.subplots(figsize=(2.2 + 2.2 * len(ratios), 4))
    for index, provider in enumerate(providers):
        positions = [shape_index + (index - (len(providers) - 1) / 2) * width for shape_index in range(len(ratios))]
        values = [by_provider.get(provider, 0.0) for by_provider in ratios.values()]
        bars = axis.bar(positions, values, width, label=provider)
        axis.bar_label(bars, labels=[f"{v:.2f}x" if v else "-" for v in values], fontsize=7)
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set_xticks(range(len(ratios)), list(ratios))
    axis.set_ylabel(f"tokens/s / {STEP_BASELINE}'s")
    card = results["machine_info"].get("cuda_device", "CPU") if device == "cuda" else "CPU"
    axis.set_title(f"ELECTRA pre-training step, {args.mode}: {card}\n{args.benchmark_json.name}", fontsize=9)
    axis.legend(fontsize=8)
    figure.savefig(args.png, dpi=120, bbox_inches="tight")
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
