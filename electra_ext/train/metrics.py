"""Run metrics: the JSONL log (and optional TensorBoard), ROC AUC, model FLOPs for MFU, and the PNG plots."""
import json
import os
from typing import Dict, List, Optional

import torch

from electra_ext._io import atomic_output

METRICS_NAME = "metrics.jsonl"
# Dense bf16/fp16 tensor-core peaks (TFLOP/s, datasheet) for MFU; other cards report no MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0}


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN without both classes."""
    scores, labels = scores.double().flatten().cpu(), labels.bool().flatten().cpu()
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.double)
    # Average the ranks within runs of equal scores.
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    average = ends - (counts.double() - 1) / 2
    ranks[order] = average[inverse]
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def training_flops_per_token(model, seq_len: int) -> float:
    """6 x (non-embedding parameters) + attention's 12 x layers x seq x hidden, per model, as in the PaLM
    paper's MFU accounting; the caller multiplies by tokens per second."""
    total = 0.0
    for part in (model.generator, model.discriminator):
        config = part.config
        embedding_parameters = sum(p.numel() for p in part.electra.embeddings.parameters())
        dense = sum(p.numel() for p in part.parameters()) - embedding_parameters
        total += 6 * dense + 12 * config.num_hidden_layers * config.hidden_size * seq_len
    return total


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


class MetricsLog:
    """Appends one JSON object per line to run_dir/metrics.jsonl (flushed, so a crash keeps what was logged);
    mirrors scalars to TensorBoard when asked. Records past `after_step` (logged after the checkpoint a run
    resumes from, or by an earlier attempt that left no checkpoint) are dropped first: they will be redone.
    TensorBoard's event files are append-only, so there each run writes a purge marker instead: readers hide
    the earlier files' events from step after_step + 1 on, and show each step once."""

    def __init__(self, run_dir: str, tensorboard: bool = False, after_step: int = 0):
        path = os.path.join(run_dir, METRICS_NAME)
        if os.path.isfile(path):
            kept = [r for r in read_metrics(run_dir) if r["step"] <= after_step]
            with atomic_output(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
        self.file = open(path, "a")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ValueError("tensorboard=True needs the tensorboard package: pip install tensorboard") from error
            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=after_step + 1)

    def write(self, split: str, step: int, values: Dict[str, float]):
        self.file.write(json.dumps({"split": split, "step": step, **values}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{split}/{name}", value, step)
            # Flushed like the JSONL: the writer's thread writes queued events when it next runs, so a crash
            # right after a log could lose them.
            self.writer.flush()

    def close(self):
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str) -> List[dict]:
    path = os.path.join(run_dir, METRICS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {METRICS_NAME} in {run_dir!r}: not an electra-ext run directory")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


PLOTS = {
    "loss.png": ("Loss", [("train", "loss"), ("train", "mlm_loss"), ("eval", "mlm_loss"),
                          ("train", "rtd_loss"), ("eval", "rtd_loss")]),
    "accuracy.png": ("Accuracy", [("train", "mlm_accuracy"), ("eval", "mlm_accuracy"),
                                  ("eval", "sampled_accuracy"), ("train", "disc_accuracy"),
                                  ("eval", "disc_accuracy"), ("eval", "disc_auc"),
                                  ("eval", "trivial_disc_accuracy")]),
}


def plot_run(run_dir: str) -> List[str]:
    """Writes loss.png and accuracy.png (curves by step) into run_dir; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    written = []
    for file_name, (title, series) in PLOTS.items():
        figure, axes = plt.subplots(figsize=(8, 5))
        for split, name in series:
            points = [(r["step"], r[name]) for r in records if r["split"] == split and name in r]
            if points:
                steps, values = zip(*points)
                axes.plot(steps, values, label=f"{split} {name}", marker="o" if split == "eval" else None,
                          linestyle="--" if split == "eval" else "-")
        if title == "Loss":
            axes.set_yscale("log")
        axes.set(title=f"{title}: {os.path.basename(os.path.abspath(run_dir))}", xlabel="step", ylabel=title.lower())
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        path = os.path.join(run_dir, file_name)
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written
