"""The pre-training loop on the embedded corpus, on the CPU: it learns (loss falls, the discriminator beats
"always original" on held-out data), leaves the run directory it promises, resumes exactly, trains the same with
gradient checkpointing, and a 2-process gloo DDP run matches one process with the same global batch."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint

import electra_ext.modules.electra as electra_module

from electra_ext.cli import main as cli_main
from electra_ext.modules.pretraining import ElectraForPretraining
from electra_ext.train import TrainConfig, pretrain
from electra_ext.train.config import resolve_device
from electra_ext.train.loop import check_resumable
from electra_ext.train.metrics import read_metrics, roc_auc
from electra_ext.train.optim import AdamWithoutBiasCorrection, build_optimizer, parameter_groups


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One token cache for the module: the embedded corpus is tokenised once."""
    return str(tmp_path_factory.mktemp("token-cache"))


def small_run(cache_dir, output_dir, **changes):
    """The tiny model on short sequences: a few seconds per ten steps on 2 cores."""
    values = dict(preset="tiny", max_seq_length=64, batch_size=8, steps=8, log_every=1, eval_every=1000,
                  eval_batches=4, checkpoint_every=1000, cache_dir=cache_dir, output_dir=str(output_dir),
                  quiet=True, seed=3, device="cpu", precision="fp32")
    values.update(changes)
    return TrainConfig(**values)


def train_records(run_dir):
    return [r for r in read_metrics(run_dir) if r["split"] == "train"]


def test_a_short_cpu_run_learns_and_leaves_the_run_directory(cache_dir, tmp_path):
    config = small_run(cache_dir, tmp_path / "run", steps=240, batch_size=16, learning_rate=1e-3, log_every=10,
                       eval_every=120, eval_batches=10, checkpoint_every=120, warmup_steps=20)
    run_dir = pretrain(config)
    records = train_records(run_dir)
    assert records[-1]["loss"] < 0.8 * records[0]["loss"]
    middle, last = [r for r in read_metrics(run_dir) if r["split"] == "eval"]
    assert (middle["step"], last["step"]) == (120, 240)
    # The generator keeps learning on held-out text (ln V = 10.3 is a uniform guess) ...
    assert last["mlm_loss"] < middle["mlm_loss"] < 10.0
    # ... and the discriminator beats answering "original" everywhere, ranking replaced tokens above real
    # ones, though its task hardens as the generator improves (ELECTRA's design: its AUC falls from ~0.85).
    for evaluation in (middle, last):
        assert evaluation["disc_accuracy"] > evaluation["trivial_disc_accuracy"]
        assert evaluation["disc_auc"] > 0.65
    for name in ("train_config.json", "metrics.jsonl", "loss.png", "accuracy.png", "model",
                 "discriminator/model.safetensors", "generator/model.safetensors", "discriminator/vocab.txt"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == [
        "step-0000120.pt", "step-0000120.pt.sha256", "step-0000240.pt", "step-0000240.pt.sha256"]
    discriminator = transformers.ElectraForPreTraining.from_pretrained(os.path.join(run_dir, "discriminator"))
    generator = transformers.ElectraForMaskedLM.from_pretrained(os.path.join(run_dir, "generator"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(run_dir, "discriminator"))
    encoded = tokenizer(["the lord said unto moses"], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(discriminator(**encoded).logits).all()
        assert generator(**encoded).logits.shape[-1] == 30522


def test_stop_and_resume_repeats_the_uninterrupted_run(cache_dir, tmp_path):
    whole = pretrain(small_run(cache_dir, tmp_path / "whole"))
    pretrain(small_run(cache_dir, tmp_path / "sliced"), stop_after_step=3)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        pretrain(small_run(cache_dir, tmp_path / "sliced"))
    sliced = pretrain(small_run(cache_dir, tmp_path / "sliced", resume=True))
    assert [r["loss"] for r in train_records(whole)] == [r["loss"] for r in train_records(sliced)]
    expected = load_file(os.path.join(whole, "model", "model.safetensors"))
    actual = load_file(os.path.join(sliced, "model", "model.safetensors"))
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    with pytest.raises(ValueError, match="batch_size \\(8 -> 16\\)"):
        pretrain(small_run(cache_dir, tmp_path / "sliced", resume=True, batch_size=16))


def test_gradient_checkpointing_trains_to_the_same_weights(cache_dir, tmp_path, monkeypatch):
    """--gradient-checkpointing recomputes every encoder layer in the backward pass (counted here) and changes no
    loss and no weight: the recomputation restores the RNG state, so dropout draws the same masks."""
    plain = pretrain(small_run(cache_dir, tmp_path / "plain", steps=4))
    recomputed_layers = []

    def counted_checkpoint(function, *args, **kwargs):
        recomputed_layers.append(function)
        return checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(electra_module, "checkpoint", counted_checkpoint)
    checkpointed = pretrain(small_run(cache_dir, tmp_path / "checkpointed", steps=4, gradient_checkpointing=True))
    layers = len({id(layer) for layer in recomputed_layers})
    assert layers == 4 and len(recomputed_layers) == 4 * 4  # generator and discriminator, 2 layers each; 4 steps
    assert [r["loss"] for r in train_records(plain)] == [r["loss"] for r in train_records(checkpointed)]
    expected = load_file(os.path.join(plain, "model", "model.safetensors"))
    actual = load_file(os.path.join(checkpointed, "model", "model.safetensors"))
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_cli_resume_takes_the_run_options_from_its_directory(cache_dir, tmp_path, capsys):
    """`--resume --output-dir DIR` alone continues a run with the options it was started with (DIR's
    train_config.json): the uninterrupted run's losses. An option given that differs still fails the check."""
    whole = pretrain(small_run(cache_dir, tmp_path / "whole"))
    sliced = pretrain(small_run(cache_dir, tmp_path / "sliced"), stop_after_step=3)
    assert cli_main(["pretrain", "--resume", "--output-dir", sliced, "--quiet"]) == 0
    assert [r["loss"] for r in train_records(sliced)] == [r["loss"] for r in train_records(whole)]
    assert cli_main(["pretrain", "--resume", "--output-dir", sliced, "--batch-size", "16"]) == 2
    assert "batch_size (8 -> 16)" in capsys.readouterr().err


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt], ids=["crash", "ctrl-c"])
def test_a_failed_run_resumes_to_the_uninterrupted_result(cache_dir, tmp_path, monkeypatch, failure):
    """A crash after the step-3 checkpoint (steps 4 and 5 logged, then lost) or a Ctrl-C at step 6 (which
    checkpoints the 5 finished steps): resuming gives the uninterrupted run's losses, each logged once."""
    from electra_ext.data.pretraining_data import BatchSchedule

    whole = pretrain(small_run(cache_dir, tmp_path / "whole"))
    original = BatchSchedule.micro_indices

    def failing(self, step, *args):
        if step == 5:
            raise failure("stopped at step 6")
        return original(self, step, *args)

    monkeypatch.setattr(BatchSchedule, "micro_indices", failing)
    with pytest.raises(failure):
        pretrain(small_run(cache_dir, tmp_path / "failed", checkpoint_every=3))
    expected_checkpoint = "step-0000003.pt" if failure is RuntimeError else "step-0000005.pt"
    assert expected_checkpoint in os.listdir(tmp_path / "failed" / "checkpoints")
    monkeypatch.setattr(BatchSchedule, "micro_indices", original)
    resumed = pretrain(small_run(cache_dir, tmp_path / "failed", checkpoint_every=3, resume=True))
    records = train_records(resumed)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["loss"] for r in records] == [r["loss"] for r in train_records(whole)]


def test_two_gloo_ranks_match_one_process_and_resume_at_another_world_size(cache_dir, tmp_path):
    """torchrun with 2 gloo ranks (micro-batches of 4) for 2 of 3 steps, then one process resumes the run:
    losses and final weights match one process that accumulated the same micro-batches all along."""
    single = pretrain(small_run(cache_dir, tmp_path / "single", steps=3, micro_batch_size=4))
    config = tmp_path / "ddp.json"
    # micro_batch_size 4: 2 ranks x 4 now, 1 process x 2 rounds x 4 after the resume (same micro-batches).
    config.write_text(json.dumps(small_run(cache_dir, tmp_path / "ddp", steps=3, micro_batch_size=4).to_dict()))
    script = tmp_path / "two_steps.py"
    script.write_text("import sys\nfrom electra_ext.train import TrainConfig, pretrain\n"
                      "pretrain(TrainConfig.from_file(sys.argv[1]), stop_after_step=2)\n")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
         str(script), str(config)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path)  # outside the source tree, whose electra_ext has no compiled _C: the installed one
    # The run also checks that both ranks hold the same weights when it stops (it raises otherwise).
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(os.listdir(tmp_path / "ddp" / "checkpoints")) == ["step-0000002.pt", "step-0000002.pt.sha256"]
    resumed = pretrain(TrainConfig.from_file(str(config), resume=True))
    assert [r["loss"] for r in train_records(resumed)] == pytest.approx(
        [r["loss"] for r in train_records(single)], rel=1e-5)
    expected = load_file(os.path.join(single, "model", "model.safetensors"))
    actual = load_file(os.path.join(resumed, "model", "model.safetensors"))
    for key in expected:
        assert torch.allclose(expected[key], actual[key], rtol=1e-5, atol=1e-6), key


def test_the_logged_learning_rate_is_the_one_its_step_used(cache_dir, tmp_path, monkeypatch):
    """Each train record's learning_rate is the rate AdamW applied in that step's update (it was the next step's)."""
    applied = []
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        applied.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    run_dir = pretrain(small_run(cache_dir, tmp_path / "run", steps=6, warmup_steps=2, learning_rate=2e-3))
    assert [r["learning_rate"] for r in train_records(run_dir)] == applied
    # The update completing step s (from 1) at base · min(1, s / warmup) · (1 - s / steps): the given rate, not
    # the preset's; the last update's rate is 0 (the reference code's schedule reaches 0 at its end too).
    assert applied == pytest.approx([2e-3 * min(1.0, s / 2) * (1 - s / 6) for s in range(1, 7)], rel=1e-12)


def model_weights(run_dir):
    return load_file(os.path.join(run_dir, "model", "model.safetensors"))


def test_the_update_averages_micro_batches_and_clips_the_gradient(cache_dir, tmp_path):
    """Gradient accumulation adds each micro-batch's loss / rounds, so 4 rounds of 2 sequences give the gradient
    of the 8 (the same norm up to the other masks drawn: 1.03x here; a sum would be 4x); with max_grad_norm tiny,
    AdamW's first update is held back by its eps (2e-4 of the unclipped one here)."""
    before = pretrain(small_run(cache_dir, tmp_path / "before", steps=1))  # one step at learning rate 0: no update
    accumulated = pretrain(small_run(cache_dir, tmp_path / "accumulated", steps=1, micro_batch_size=2))
    ratio = train_records(accumulated)[0]["grad_norm"] / train_records(before)[0]["grad_norm"]
    assert 0.7 < ratio < 1.4, ratio
    one_update = dict(steps=2, warmup_steps=1, weight_decay=0.0)  # step 1 at half the rate, step 2 at 0
    updates = [pretrain(small_run(cache_dir, tmp_path / name, **one_update, **changes))
               for name, changes in (("unclipped", {}), ("clipped", dict(max_grad_norm=1e-9)))]
    initial = model_weights(before)
    unclipped, clipped = ([(weights[k] - initial[k]).abs().max().item() for k in initial]
                          for weights in map(model_weights, updates))
    assert max(unclipped) > 1e-5 and max(clipped) < 1e-3 * max(unclipped)


def test_records_average_their_window_and_evaluation_runs_the_model_in_eval_mode(cache_dir, tmp_path,
                                                                                 monkeypatch):
    """log_every=2 records the mean of what log_every=1 records for its two steps; keep_checkpoints=2 leaves the
    newest two; evaluations run the model without dropout and without gradients, training steps with both."""
    modes = []
    original_forward = ElectraForPretraining.forward

    def forward(self, *args, **kwargs):
        modes.append((self.training, torch.is_grad_enabled()))
        return original_forward(self, *args, **kwargs)

    monkeypatch.setattr(ElectraForPretraining, "forward", forward)
    every_step = train_records(pretrain(small_run(cache_dir, tmp_path / "every", steps=4)))
    paired = train_records(pretrain(small_run(cache_dir, tmp_path / "paired", steps=4, log_every=2, eval_every=2,
                                              checkpoint_every=1, keep_checkpoints=2)))
    assert [r["step"] for r in paired] == [2, 4]
    for record, window in zip(paired, (every_step[:2], every_step[2:])):
        for name in ("loss", "mlm_loss", "rtd_loss", "mlm_accuracy"):
            assert record[name] == pytest.approx((window[0][name] + window[1][name]) / 2, rel=1e-6), name
    assert sorted(os.listdir(tmp_path / "paired" / "checkpoints")) == [
        "step-0000003.pt", "step-0000003.pt.sha256", "step-0000004.pt", "step-0000004.pt.sha256"]
    assert set(modes) == {(True, True), (False, False)}


RESUME_DECIDING_CHANGES = dict(
    data=("other.txt",), vocab="vocab.txt", text_field="body", preset="small", sharing="untied", masking="bert",
    mask_prob=0.2, gen_weight=2.0, disc_weight=10.0, temperature=0.5, steps=9, batch_size=16, max_seq_length=32,
    learning_rate=1e-3, warmup_steps=3, weight_decay=0.1, adam_betas=(0.8, 0.99), adam_epsilon=1e-8,
    adam_bias_correction=False, max_grad_norm=2.0, precision="bf16", seed=4)


@pytest.mark.parametrize("name", sorted(RESUME_DECIDING_CHANGES))
def test_resume_refuses_a_change_to_what_decides_the_run(tmp_path, name):
    """What decides the model, the data order and the updates must match the run resumed; how this invocation
    runs (device, workers, micro-batches, output) may change."""
    saved = small_run("cache", tmp_path)
    with pytest.raises(ValueError, match=f"differ from the run being resumed: {name} "):
        check_resumable(saved, dataclasses.replace(saved, **{name: RESUME_DECIDING_CHANGES[name]}))
    check_resumable(saved, dataclasses.replace(saved, quiet=False, num_workers=1, micro_batch_size=4,
                                               gradient_checkpointing=True, log_every=5))


def test_weight_decay_spares_layer_norms_and_biases():
    """The reference code's rule, by HF parameter name: no decay on LayerNorm weights and biases, nor on any
    bias; decay on every other weight, embeddings included; each parameter (shared ones too) in one group."""
    model = ElectraForPretraining("tiny", sharing="gdes")
    decay, no_decay = parameter_groups(model, 0.01)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.01, 0.0)
    named = dict(model.named_parameters())  # shared parameters once
    spared = {id(p) for name, p in named.items() if "LayerNorm" in name or name.endswith(".bias")}
    assert {id(p) for p in no_decay["params"]} == spared
    assert {id(p) for p in decay["params"]} == {id(p) for p in named.values()} - spared
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)


def test_the_reference_adam_takes_the_reference_codes_steps():
    """google-research/electra's AdamWeightDecayOptimizer: m and v without bias correction, then
    p -= lr · (m / (sqrt(v) + eps) + weight_decay · p)."""
    parameter = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    optimizer = AdamWithoutBiasCorrection([{"params": [parameter], "weight_decay": 0.1}], lr=0.01,
                                          betas=(0.9, 0.999), eps=1e-6)
    expected = parameter.detach().clone()
    m, v = torch.zeros_like(expected), torch.zeros_like(expected)
    for gradient in ([0.1, -0.2, 0.3], [0.3, 0.1, -0.2], [-0.1, 0.2, 0.1]):
        gradient = torch.tensor(gradient, dtype=torch.float64)
        parameter.grad = gradient.clone()
        optimizer.step()
        m, v = 0.9 * m + 0.1 * gradient, 0.999 * v + 0.001 * gradient**2
        expected = expected - 0.01 * (m / (v.sqrt() + 1e-6) + 0.1 * expected)
        assert torch.allclose(parameter.detach(), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("bias_correction,kind", [(True, torch.optim.AdamW), (False, AdamWithoutBiasCorrection)])
def test_the_optimizer_takes_the_configured_hyperparameters(tmp_path, bias_correction, kind):
    config = small_run("cache", tmp_path, learning_rate=3e-4, adam_betas=(0.8, 0.99), adam_epsilon=1e-7,
                       adam_bias_correction=bias_correction).resolve()
    optimizer = build_optimizer(ElectraForPretraining("tiny"), config)
    assert type(optimizer) is kind
    assert (optimizer.defaults["lr"], optimizer.defaults["betas"], optimizer.defaults["eps"]) == (3e-4, (0.8, 0.99),
                                                                                                1e-7)


def test_auc_counts_ties_as_half():
    """Against the definition: the chance that a replaced token scores above an original one, ties counting 1/2."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (300,), generator=generator).double()  # few values: many ties
    labels = torch.rand(300, generator=generator) < 0.3
    replaced, original = scores[labels][:, None], scores[~labels][None, :]
    expected = ((replaced > original).double() + 0.5 * (replaced == original).double()).mean().item()
    assert roc_auc(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_a_cuda_device_is_named_with_its_index(monkeypatch, tmp_path, capsys):
    """torch.cuda.set_device and DDP take only a CUDA device with an index: auto and cuda become the current
    device (the default GPU run stopped at set_device("cuda") before); a device the machine lacks is an error
    naming it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert [resolve_device(d) for d in ("auto", "cuda", "cuda:0", "cpu")] == ["cuda:1", "cuda:1", "cuda:0", "cpu"]
    assert TrainConfig(device="cuda", precision="fp32").resolve().device == "cuda:1"
    with pytest.raises(ValueError, match="'cuda:2', but this machine has 2 CUDA device"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    assert cli_main(["pretrain", "--device", "cuda", "--output-dir", str(tmp_path / "run")]) == 2
    assert "device is 'cuda', but torch finds no CUDA device on this machine" in capsys.readouterr().err


def test_a_gpu_run_takes_each_presets_steps_from_the_paper(monkeypatch):
    """Table 6 of the ELECTRA paper: Small 1M steps, Base 766k, Large 400k (every preset got 1M before: Base and
    Large decayed their learning rate over another horizon and ran 1.3x and 2.5x the paper's compute)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    paper = {"small": 1_000_000, "base": 766_000, "large": 400_000}
    for preset, steps in paper.items():
        assert TrainConfig(device="cuda", precision="fp32", preset=preset).resolve().steps == steps
    assert TrainConfig(device="cuda", precision="fp32").resolve().steps == paper["small"]
    assert TrainConfig(device="cuda", precision="fp32", preset="base", steps=10).resolve().steps == 10
    assert TrainConfig(device="cpu", preset="base").resolve().steps == 800  # the CPU run's, whatever the size
    # The learning rate: the paper's for the preset unless given.
    assert TrainConfig(device="cuda", precision="fp32", preset="base").resolve().learning_rate == 2e-4
    assert TrainConfig(device="cuda", precision="fp32", learning_rate=1e-3).resolve().learning_rate == 1e-3


def test_cli_help_names_every_option(capsys):
    with pytest.raises(SystemExit):
        cli_main(["pretrain", "--help"])
    text = capsys.readouterr().out
    for option in ("--preset", "--data", "--batch-size", "--precision", "--resume", "--sharing", "--config"):
        assert option in text


def test_cli_reports_bad_options_clearly(capsys, tmp_path):
    assert cli_main(["pretrain", "--preset", "huge", "--output-dir", str(tmp_path / "x")]) == 2
    assert "preset must be auto or one of tiny, small, base, large" in capsys.readouterr().err
    config = tmp_path / "run.yaml"
    config.write_text("steps: 5\nlearning_rat: 0.1\n")
    assert cli_main(["pretrain", "--config", str(config)]) == 2
    assert "unknown training options ['learning_rat']" in capsys.readouterr().err


def test_cli_trains_a_tokenizer_and_redraws_plots(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"line {i} of the tiny corpus, with words.\nanother line {i * 7}" for i in range(300)))
    assert cli_main(["train-tokenizer", str(corpus), "--output-dir", str(tmp_path / "tok"), "--vocab-size", "120",
                     "--min-frequency", "1"]) == 0
    from electra_ext.data.tokenizer import load_tokenizer, special_token_ids

    tokenizer = load_tokenizer(str(tmp_path / "tok"))
    assert 5 < tokenizer.get_vocab_size() <= 120
    assert set(special_token_ids(tokenizer)) == {"cls", "sep", "mask", "pad"}
    assert tokenizer.encode("Line").ids == tokenizer.encode("line").ids
    assert cli_main(["train-tokenizer", str(corpus), "--output-dir", str(tmp_path / "cased"), "--vocab-size", "120",
                     "--min-frequency", "1", "--cased"]) == 0
    cased = load_tokenizer(str(tmp_path / "cased"))
    assert cased.encode("Line").ids != cased.encode("line").ids

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = [{"split": "train", "step": s, "loss": 40.0 / s, "mlm_loss": 9.0, "rtd_loss": 0.5,
                "mlm_accuracy": 0.01 * s, "disc_accuracy": 0.8} for s in (1, 2, 3)]
    records.append({"split": "eval", "step": 3, "mlm_loss": 8.0, "disc_auc": 0.7, "disc_accuracy": 0.9})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert cli_main(["plot", str(run_dir)]) == 0
    for name in ("loss.png", "accuracy.png"):
        assert (run_dir / name).read_bytes().startswith(b"\x89PNG")
    assert cli_main(["plot", str(tmp_path / "tok")]) == 2
    assert "not an electra-ext run directory" in capsys.readouterr().err
