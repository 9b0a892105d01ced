"""Convergence parity in CI: the tiny model trained 200 steps in fp32 on the CPU kernels and on the reference path,
same seed and data (convergence.py), gives the same training curves within TOLERANCES.

SEED_SPREAD is the largest difference between the 25-step means of two reference runs with seeds 1 and 2, from
benchmarks/results/2026-11-26-cpu-daadf04-tiny-convergence.json (`python benchmarks/convergence.py --device cpu
--preset tiny --steps 200 --batch-size 8 --seq-len 64 --precision fp32 --vocab-size 4096 --characters 600000`).
Same-seed runs draw the same masks, dropout and Gumbel noise, so the kernels and the reference differ only by
rounding: in that run by 4.5e-7 of the spread on the loss and not at all on the accuracies. A wrong gradient
moves them far more: with attention's dq halved the loss differed by 2.7% of the spread and the RTD loss by
2.8%. TOLERANCE_FRACTION = 1% of the spread sits between the two, four orders of magnitude above rounding.
"""
from pathlib import Path

import pytest
import torch

from convergence import METRICS, largest_differences, train_curves, training_data

STEPS, BATCH_SIZE, SEQ_LEN, WINDOW, SEED = 200, 8, 64, 25, 1
# The 4096 word pieces most frequent in the text: the reference generator head draws its Gumbel noise with
# PyTorch ops for every logit, and BERT's 30522 would make the reference run several times longer.
VOCAB_SIZE, CHARACTERS = 4096, 600_000
SEED_SPREAD = {"loss": 0.682, "mlm_loss": 0.0441, "rtd_loss": 0.0134, "mlm_accuracy": 0.0267, "disc_accuracy": 0.0343}
TOLERANCE_FRACTION = 0.01
TOLERANCES = {name: TOLERANCE_FRACTION * SEED_SPREAD[name] for name in METRICS}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return training_data(Path(tmp_path_factory.mktemp("parity")), SEQ_LEN, CHARACTERS, VOCAB_SIZE)


@pytest.fixture
def one_thread():
    """The runs are 400 small steps (about 0.1 s each on one core) whose ops are too short for two threads to gain
    much, and on a busy machine the OpenMP workers spin waiting for each other: on the 2-core development
    machine under load this test took 726 s with two threads and 115 s with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_kernels_train_like_the_reference_path(data, one_thread):
    run = dict(preset="tiny", steps=STEPS, batch_size=BATCH_SIZE, seed=SEED, device="cpu", precision="fp32")
    differences = largest_differences(train_curves(data, reference=False, **run),
                                      train_curves(data, reference=True, **run), WINDOW)
    too_far = {name: f"{differences[name]:.3g} > {TOLERANCES[name]:.3g}" for name in METRICS
               if not differences[name] <= TOLERANCES[name]}
    assert not too_far, f"kernels vs reference, largest difference of {WINDOW}-step means: {too_far}"
