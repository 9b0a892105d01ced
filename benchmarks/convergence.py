"""Convergence parity: ELECTRA pre-training on electra_ext's kernels against its pure-PyTorch reference path.

Both train the same model from the same seed on the same batches (Jane Austen from the embedded corpus), with
the optimizer, schedule and clipping of `electra-ext pretrain`; every op keys its randomness (masking draws,
dropout, Gumbel noise) to the seed, so the two runs differ only by the kernels' arithmetic. Their curves (the
loss and its two parts, MLM accuracy, discriminator accuracy), as means over windows of steps, must agree
within tolerances set from the spread between two reference runs with different seeds.

test_convergence_parity.py runs this on the CPU in CI (tiny preset, fp32). On a GPU, in bf16 with
ELECTRA-Small, this script computes the spread in the same run (two reference seeds), compares, and saves
the curves and their plot:

    python benchmarks/convergence.py --device cuda --preset small --steps 300 --out-dir benchmarks/results
"""
import argparse
import contextlib
import dataclasses
import json
import lzma
import os
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from electra_ext.data.corpus import CORPUS_DIR
from electra_ext.data.pretraining_data import BatchSchedule, PretrainingData
from electra_ext.data.tokenizer import load_tokenizer, special_token_ids
from electra_ext.modules.config import preset as model_preset
from electra_ext.modules.pretraining import ElectraForPretraining, ElectraPretrainingConfig
from electra_ext.train.config import TrainConfig
from electra_ext.train.loop import derived_seed, to_device
from electra_ext.train.optim import build_optimizer, linear_warmup_linear_decay
from reference_path import reference_path
from summarize import git_commit

METRICS = ("loss", "mlm_loss", "rtd_loss", "mlm_accuracy", "disc_accuracy")
DATA_SEED = 0  # example building and batch order: the same for every run, whatever its model seed


def corpus_slice(directory: Path, characters: int) -> Path:
    """The first `characters` of Jane Austen's novels, cut at a document boundary, as a text file."""
    with lzma.open(os.path.join(CORPUS_DIR, "jane_austen.txt.xz"), "rt", encoding="utf-8") as f:
        text = f.read(characters)
    path = Path(directory) / "jane_austen_slice.txt"
    path.write_text(text[:text.rindex("\n\n")] + "\n", encoding="utf-8")
    return path


def frequent_vocabulary(text: Path, size: int, directory: Path) -> Path:
    """BERT's uncased vocabulary cut to its special tokens and the word pieces most frequent in `text` (ties
    by id), `size` entries in BERT's order, as a vocab.txt. A vocabulary trained on the text would do, but
    the WordPiece trainer's choice among equally frequent pairs varies from run to run (937 of 4096 entries
    differed between two trainings on the same slice), and the data must be the same in every run."""
    tokenizer = load_tokenizer()
    lines = [line for line in text.read_text(encoding="utf-8").splitlines() if line.strip()]
    ids = np.concatenate([encoding.ids for encoding in tokenizer.encode_batch(lines, add_special_tokens=False)])
    counts = np.bincount(ids, minlength=tokenizer.get_vocab_size())
    keep = set(special_token_ids(tokenizer).values()) | {tokenizer.token_to_id("[UNK]")}
    keep |= set(np.argsort(-counts, kind="stable")[:size - len(keep)].tolist())
    path = Path(directory) / "vocab.txt"
    path.write_text("".join(tokenizer.id_to_token(i) + "\n" for i in sorted(keep)), encoding="utf-8")
    return path


def training_data(directory: Path, seq_len: int, characters: int, vocab_size=None) -> PretrainingData:
    """The slice's examples of seq_len tokens. vocab_size None: BERT's uncased vocabulary (ELECTRA's); a
    number: its `vocab_size` entries most frequent in the slice (frequent_vocabulary: a smaller generator
    head)."""
    text = corpus_slice(directory, characters)
    vocab = None if vocab_size is None else str(frequent_vocabulary(text, vocab_size, directory))
    return PretrainingData([str(text)], max_length=seq_len, seed=DATA_SEED, vocab=vocab,
                           cache_dir=str(Path(directory) / "token-cache"), num_workers=1)


def train_curves(data: PretrainingData, *, preset: str, steps: int, batch_size: int, seed: int, device: str,
                 precision: str, reference: bool) -> dict:
    """Trains from scratch; returns {metric: float64 array [steps]} of the per-step training values."""
    seq_len = data.train.batch(np.arange(1))["input_ids"].shape[1]
    config = TrainConfig(preset=preset, steps=steps, batch_size=batch_size, max_seq_length=seq_len, device=device,
                         precision=precision, seed=seed).resolve()
    chosen = model_preset(preset)
    vocabulary = dict(vocab_size=data.vocab_size, pad_token_id=data.special.pad)
    torch.manual_seed(seed)
    model = ElectraForPretraining(ElectraPretrainingConfig(
        discriminator=dataclasses.replace(chosen.discriminator, **vocabulary),
        generator=dataclasses.replace(chosen.generator, **vocabulary),
        mask_prob=config.mask_prob, cls_token_id=data.special.cls, sep_token_id=data.special.sep,
        mask_token_id=data.mask_token_id)).to(device).train()
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: linear_warmup_linear_decay(step, config.warmup_steps, config.steps))
    autocast = (lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)) if precision == "bf16" \
        else contextlib.nullcontext
    schedule = BatchSchedule(len(data.train), batch_size, DATA_SEED)
    records = []
    with reference_path() if reference else contextlib.nullcontext():
        for step in range(steps):
            batch = to_device(data.train.batch(schedule.global_indices(step)), torch.device(device))
            torch.manual_seed(derived_seed(seed, step))
            with autocast():
                out = model(**batch)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            values = {"loss": out.loss, "mlm_loss": out.mlm_loss, "rtd_loss": out.rtd_loss, **out.metrics}
            records.append(torch.stack([values[name].detach().float() for name in METRICS]))
    stacked = torch.stack(records).double().cpu().numpy()  # one host transfer for the whole run
    return {name: stacked[:, i] for i, name in enumerate(METRICS)}


def window_means(curve: np.ndarray, window: int) -> np.ndarray:
    """Means over consecutive windows of `window` steps (a last, partial window is dropped)."""
    usable = len(curve) // window * window
    return curve[:usable].reshape(-1, window).mean(axis=1)


def largest_differences(a: dict, b: dict, window: int) -> dict:
    """{metric: the largest |a - b| between the two runs' window means}."""
    return {name: float(np.abs(window_means(a[name], window) - window_means(b[name], window)).max())
            for name in METRICS}


def plot_curves(runs: dict, window: int, path: Path, title: str):
    """One panel per metric, the window means of each run (label -> curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.6))
    for axis, name in zip(axes, METRICS):
        for label, curves in runs.items():
            means = window_means(curves[name], window)
            axis.plot((np.arange(len(means)) + 1) * window, means, label=label,
                      linestyle="--" if "reference" in label else "-")
        axis.set(title=name, xlabel="step")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(title)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--window", type=int, default=25, help="steps per mean compared")
    parser.add_argument("--seeds", type=int, nargs=2, default=(1, 2), help="the two reference seeds; the "
                        "kernels train with the first")
    parser.add_argument("--characters", type=int, default=4_000_000, help="text taken from the corpus")
    parser.add_argument("--vocab-size", type=int, help="keep this many of BERT's word pieces, the most frequent "
                        "in the text (default: all of BERT's uncased vocabulary)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()

    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        # The runs read the token cache in `work`: they train inside this block.
        data = training_data(Path(work), args.seq_len, args.characters, args.vocab_size)
        run = dict(preset=args.preset, steps=args.steps, batch_size=args.batch_size, device=args.device,
                   precision=args.precision)
        first, second = args.seeds
        runs = {f"reference, seed {first}": train_curves(data, seed=first, reference=True, **run),
                f"reference, seed {second}": train_curves(data, seed=second, reference=True, **run),
                f"kernels, seed {first}": train_curves(data, seed=first, reference=False, **run)}
        reference_a, reference_b, kernels = runs.values()
        spread = largest_differences(reference_a, reference_b, args.window)
        difference = largest_differences(kernels, reference_a, args.window)
        agree = all(difference[name] <= spread[name] for name in METRICS)

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    commit = git_commit()
    stem = f"{datetime.now():%Y-%m-%d}-{device_name.lower().replace(' ', '-')}-{commit}-{args.preset}-convergence"
    plot_curves(runs, args.window, args.out_dir / f"{stem}.png",
                f"ELECTRA-{args.preset}, {args.precision}, {device_name}: means over {args.window} steps")
    (args.out_dir / f"{stem}.json").write_text(json.dumps({
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": device_name, "torch": torch.__version__, "commit": commit,
        "date": datetime.now().isoformat(timespec="seconds"),
        "seed_spread": spread, "kernels_vs_reference": difference, "agree": agree,
        "curves": {label: {name: curve.tolist() for name, curve in curves.items()} for label, curves in runs.items()},
    }, indent=1) + "\n")
    for name in METRICS:
        print(f"{name:14s} kernels vs reference {difference[name]:.3g}   seed spread {spread[name]:.3g}")
    print(f"curves and plot: {args.out_dir / stem}.json, .png")
    sys.exit(0 if agree else 1)


if __name__ == "__main__":
    main()
