"""The pre-training loop on the embedded corpus, on the CPU: it learns (loss falls, the discriminator beats
"always original" on held-out data), leaves the run directory it promises, resumes exactly, trains the same with
gradient checkpointing, and a 2-process gloo DDP run matches one process with the same global batch."""
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
from electra_ext.train import TrainConfig, pretrain
from electra_ext.train.config import resolve_device
from electra_ext.train.metrics import read_metrics


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
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
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
    run_dir = pretrain(small_run(cache_dir, tmp_path / "run", steps=6, warmup_steps=2))
    assert [r["learning_rate"] for r in train_records(run_dir)] == applied
    assert len(applied) == 6 and applied[0] < applied[1]  # warming up


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
