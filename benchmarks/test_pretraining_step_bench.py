"""A full ELECTRA pre-training step (masking, generator, sampling, discriminator, backward, optimizer step) for
each provider of pretraining_step.py: electra_ext's kernels, its reference path, HF transformers with SDPA, and
HF under torch.compile. bf16 autocast on CUDA, fp32 on the CPU; the same batch for every provider.

Recorded per case: ms/step and tokens/s (summarize.py), the model FLOPs of the step (model_flops.py) for MFU
against the card's datasheet bf16 peak (electra_ext.train.metrics.PEAK_TFLOPS) and against the bf16
matrix-product rate measured in the same run (test_matmul_rate), and on CUDA the peak memory.
test_largest_batch finds, per provider, the largest batch whose step fits in MEMORY_BUDGET_BYTES, and times
the step there.

Run all:   pytest benchmarks/test_pretraining_step_bench.py -k cuda --benchmark-json bench.json
CI (CPU):  pytest benchmarks/ --benchmark-disable   (each case runs once, as a smoke test)
"""
import pytest
import torch

pytest.importorskip("transformers", reason="the HF providers need transformers (pip install '.[test]')")

from electra_ext.train.metrics import peak_flops
from model_flops import training_flops_per_token
from pretraining_step import PROVIDERS, TrainingStep, make_batch, pretraining_config

# shape name -> (preset, sequences, tokens per sequence). CUDA: ELECTRA-Small as the paper trains it (128 x
# 128) and ELECTRA-Base at 32 x 512, a batch HF's eager step fits on an 80 GB card with room to spare (its
# [B, T, V] generator logits alone take 32 x 512 x 30522 x (2 + 4 + 4) bytes = 5 GB). The CPU runs the tiny
# and small presets on a few sequences, so that CI's single round stays in seconds.
SHAPES = {
    "cuda": {"small": ("small", 128, 128), "base": ("base", 32, 512)},
    "cpu": {"tiny": ("tiny", 4, 128), "small": ("small", 2, 128)},
}
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=NO_CUDA)]
CASES = [pytest.param(device, shape, id=f"{device}-{shape}", marks=[NO_CUDA] if device == "cuda" else [])
         for device in SHAPES for shape in SHAPES[device]]
# A step takes >= 10 ms even at ELECTRA-Small on an H100, so the ~10 us synchronize that ends a round is
# < 0.1% of one step: one step per round.
STEP_REPS = 1
# The largest-batch search: the budget is half an H100's 80 GB, so H100 and H200 runs report the same
# batches, with the other half left to the CUDA context and the allocator's fragmentation.
MEMORY_BUDGET_BYTES = 40 * 2**30
# Matrix products for the measured bf16 rate: 8192^3 (1.1 TFLOP, ~1.5 ms on an H100) is large enough to
# reach the tensor cores' sustained rate; the CPU's 512^3 fp32 takes milliseconds.
MATMUL_SIZE = {"cuda": 8192, "cpu": 512}


def skip_unless_runnable(device, provider):
    if provider.endswith("_compiled") and device == "cpu":
        pytest.skip("inductor's C++ compile of a training step takes minutes on a 2-core CPU (251 s measured for "
                    "HF's at the tiny preset); the CUDA cases run it, and tests/test_pretraining.py checks the "
                    "compiled electra_ext step on the CPU")


def record_step(timed_benchmark, step, device, shape, provider, batch_size, mode, **info):
    preset, _, seq_len = SHAPES[device][shape]
    batch = make_batch(preset, batch_size, seq_len, device)
    tokens = batch_size * seq_len
    timed_benchmark(
        lambda: step(batch),
        device=device, shape=shape, mode=mode, bytes_per_call=None, reps=STEP_REPS,
        op="pretraining_step", provider=provider, preset=preset, batch=batch_size, seq_len=seq_len,
        tokens=tokens, flops=training_flops_per_token(pretraining_config(preset), seq_len) * tokens,
        dtype="bfloat16" if device == "cuda" else "float32", peak_flops=peak_flops(torch.device(device)), **info,
    )


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("device,shape", CASES)
def test_pretraining_step(timed_benchmark, device, shape, provider):
    skip_unless_runnable(device, provider)
    preset, batch_size, _ = SHAPES[device][shape]
    record_step(timed_benchmark, TrainingStep(provider, preset, device), device, shape, provider, batch_size, "step")


def peak_step_bytes(step, batch):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step(batch)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def largest_batch(step, preset, seq_len, first_batch):
    """The largest batch whose step peaks within MEMORY_BUDGET_BYTES, to within 5%. A step's peak is parameters,
    gradients and optimizer state (fixed) plus activations (proportional to the batch): the line through the
    peaks at first_batch and twice it gives the estimate, which then grows by 5% while a step fits, or shrinks by
    5% until one does."""
    def peak(batch_size):
        return peak_step_bytes(step, make_batch(preset, batch_size, seq_len, "cuda"))

    def fits(batch_size):
        try:
            return peak(batch_size) <= MEMORY_BUDGET_BYTES
        except torch.OutOfMemoryError:
            step.optimizer.zero_grad(set_to_none=True)  # a step that failed in backward left gradients behind
            return False
        finally:
            torch.cuda.empty_cache()

    peak(first_batch)  # the first step creates the optimizer state (and compiles)
    low, high = peak(first_batch), peak(2 * first_batch)
    if high <= low:
        raise AssertionError(f"the step's peak did not grow with the batch ({low} bytes at {first_batch} "
                             f"sequences, {high} at {2 * first_batch}): no line to estimate from")
    per_sequence = (high - low) / first_batch
    batch_size = int((MEMORY_BUDGET_BYTES - (low - per_sequence * first_batch)) / per_sequence)
    if batch_size > 0 and fits(batch_size):
        while fits(grown := max(batch_size + 1, int(batch_size * 1.05))):
            batch_size = grown
        return batch_size
    while batch_size > 0:
        batch_size = int(batch_size * 0.95)
        if batch_size > 0 and fits(batch_size):
            return batch_size
    raise AssertionError(f"no batch fits in {MEMORY_BUDGET_BYTES / 2**30:.0f} GiB")


@NO_CUDA
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", [pytest.param(shape, id=f"cuda-{shape}") for shape in SHAPES["cuda"]])
def test_largest_batch(timed_benchmark, shape, provider):
    preset, first_batch, seq_len = SHAPES["cuda"][shape]
    step = TrainingStep(provider, preset, "cuda")
    batch_size = largest_batch(step, preset, seq_len, first_batch // 4)
    # The search's second batch size made a compiled step's graphs dynamic (cheap: one recompile for every size
    # tried); the reset makes the timing's warm-up round compile the found size as static graphs.
    torch._dynamo.reset()
    record_step(timed_benchmark, step, "cuda", shape, provider, batch_size, "largest_batch",
                memory_budget_bytes=MEMORY_BUDGET_BYTES)


@pytest.mark.parametrize("device", DEVICES)
def test_matmul_rate(timed_benchmark, device):
    size = MATMUL_SIZE[device]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(size, size, device=device, dtype=dtype)
    timed_benchmark(lambda: torch.mm(a, b, out=out), device=device, shape=f"{size}^3", mode="matmul",
                    bytes_per_call=3 * size * size * a.element_size(), op="pretraining_step", provider="matmul",
                    flops=2 * size**3, dtype=str(dtype))
