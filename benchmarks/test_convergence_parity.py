"""Convergence parity in CI: the tiny model trained 200 steps in fp32 on the CPU kernels and on the reference path,
same seed and data (convergence.py), gives the same training curves within TOLERANCES.

Both runs draw the same masks, dropout and Gumbel noise, so they differ only by the kernels' rounding, amplified
over 200 steps. The tolerances come from the spread between two reference runs with seeds 1 and 2 (SPREAD
below, from benchmarks/results/CONVERGENCE_RESULTS): the largest difference of 25-step means over the run.
TOLERANCE_FRACTION of that spread is allowed: TUNED
"""
from pathlib import Path

import pytest

from convergence import METRICS, largest_differences, train_curves, training_data

STEPS, BATCH_SIZE, SEQ_LEN, WINDOW, SEED = 200, 8, 64, 25, 1
# A 4096-entry vocabulary trained on the text: the reference generator head's cost grows with the vocabulary
# (its Philox noise is drawn in PyTorch ops for every logit), and a small one keeps the reference run in CI time.
VOCAB_SIZE, CHARACTERS = 4096, 600_000
SPREAD = {}
TOLERANCE_FRACTION = None
TOLERANCES = {name: TOLERANCE_FRACTION * SPREAD[name] for name in METRICS}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return training_data(Path(tmp_path_factory.mktemp("parity")), SEQ_LEN, CHARACTERS, VOCAB_SIZE)


def test_kernels_train_like_the_reference_path(data):
    run = dict(preset="tiny", steps=STEPS, batch_size=BATCH_SIZE, seed=SEED, device="cpu", precision="fp32")
    differences = largest_differences(train_curves(data, reference=False, **run),
                                      train_curves(data, reference=True, **run), WINDOW)
    too_far = {name: f"{differences[name]:.3g} > {TOLERANCES[name]:.3g}" for name in METRICS
               if not differences[name] <= TOLERANCES[name]}
    assert not too_far, f"kernels vs reference, largest difference of {WINDOW}-step means: {too_far}"
