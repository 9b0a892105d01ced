"""ELECTRA pre-training, top to bottom: `pretrain(TrainConfig(...))` is what `electra-ext pretrain` runs.

One process, or one per GPU under `torchrun` (DistributedDataParallel; NCCL on GPU, gloo on CPU): every rank
builds the same model from the same seed, takes its own micro-batches of each global batch, and only rank 0
logs and writes. Each micro-batch's randomness (masking, sampling, dropout) is seeded from (seed, step,
micro-batch index), so a step computes the same thing whatever the world size, for the same micro-batch size
(another size splits the batch, and its draws, differently), and a resumed run repeats an uninterrupted one.
"""
import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
import warnings
from datetime import datetime
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from electra_ext._io import atomic_output
from electra_ext.data.pretraining_data import BatchSchedule, PretrainingData
from electra_ext.data.tokenizer import save_for_transformers
from electra_ext.modules.config import preset as model_preset
from electra_ext.modules.pretraining import ElectraForPretraining, ElectraPretrainingConfig, discriminator_metrics
from electra_ext.train.checkpoint import (checkpoint_files, checkpoint_path, complete_checkpoints, is_complete,
                                          load_checkpoint, resumable_checkpoint, rng_states, save_checkpoint,
                                          set_rng_states)
from electra_ext.train.config import TRAIN_CONFIG_NAME, TrainConfig
from electra_ext.train.metrics import MetricsLog, peak_flops, plot_run, roc_auc, training_flops_per_token
from electra_ext.train.optim import build_optimizer, linear_warmup_linear_decay

CHECKPOINT_DIR = "checkpoints"
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def pretrain(config: TrainConfig, *, stop_after_step: Optional[int] = None) -> str:
    """Trains; returns the run directory. stop_after_step: leave after that step with a checkpoint (a
    time-sliced job; resume continues it)."""
    # --- Processes: torchrun's environment makes this one rank of a DDP group.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    distributed = world_size > 1
    if distributed and not dist.is_initialized():
        wants_cuda = config.device != "cpu" and torch.cuda.is_available()
        dist.init_process_group("nccl" if wants_cuda else "gloo")
    if config.device == "auto" and distributed and torch.cuda.is_available():
        config = dataclasses.replace(config, device=f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    config = config.resolve(world_size)
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    is_main = rank == 0
    accumulation = config.batch_size // (config.micro_batch_size * world_size)

    # --- The run directory: a new one, or the one to resume.
    run_dir = shared_value(config.output_dir or os.path.join(
        "runs", f"electra-{config.preset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"))
    checkpoint_dir = os.path.join(run_dir, CHECKPOINT_DIR)
    if checkpoint_files(checkpoint_dir) and not config.resume:
        raise ValueError(f"{run_dir} already holds checkpoints: pass resume=True (--resume) to continue it, "
                         f"or choose another output_dir")
    if is_main:
        os.makedirs(checkpoint_dir, exist_ok=True)
    # Rank 0 alone sets corrupted and incomplete checkpoints aside; every rank then loads the one it chose.
    checkpoint = shared_value(resumable_checkpoint(checkpoint_dir) if is_main and config.resume else None)
    if checkpoint:
        with open(os.path.join(run_dir, TRAIN_CONFIG_NAME)) as f:
            saved = TrainConfig.from_dict(json.load(f))
        check_resumable(saved, config)
    elif config.resume and is_main:
        print(f"resume: no checkpoint in {checkpoint_dir} yet: starting at step 0")

    # --- Data: rank 0 tokenises and builds the examples first, the others then open the cache.
    def load_data():
        return PretrainingData(config.data, max_length=config.max_seq_length, seed=config.seed, vocab=config.vocab,
                               text_field=config.text_field, cache_dir=config.cache_dir,
                               num_workers=config.num_workers)
    data = load_data() if is_main else None
    barrier()
    data = data or load_data()
    schedule = BatchSchedule(len(data.train), config.batch_size, config.seed)

    # --- The model: the preset's generator and discriminator on this tokenizer's vocabulary.
    torch.manual_seed(config.seed)
    chosen = model_preset(config.preset)
    vocabulary = dict(vocab_size=data.vocab_size, pad_token_id=data.special.pad)
    model = ElectraForPretraining(ElectraPretrainingConfig(
        discriminator=dataclasses.replace(chosen.discriminator, **vocabulary),
        generator=dataclasses.replace(chosen.generator, **vocabulary),
        sharing=config.sharing, mask_prob=config.mask_prob, masking=config.masking,
        temperature=config.temperature, gen_weight=config.gen_weight, disc_weight=config.disc_weight,
        cls_token_id=data.special.cls, sep_token_id=data.special.sep, mask_token_id=data.mask_token_id,
    )).to(device)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if distributed else model
    if config.compile:
        forward = torch.compile(forward)
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: linear_warmup_linear_decay(step, config.warmup_steps, config.steps))
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    autocast = (lambda: torch.autocast(device.type, dtype=AUTOCAST_DTYPES[config.precision])) \
        if config.precision in AUTOCAST_DTYPES else contextlib.nullcontext

    start_step = 0
    if checkpoint:
        start_step = restore_training_state(load_checkpoint(checkpoint), model, optimizer, scheduler, scaler)
    if is_main and not checkpoint:
        with atomic_output(os.path.join(run_dir, TRAIN_CONFIG_NAME), "w") as f:
            json.dump(config.to_dict(), f, indent=2)
    log = MetricsLog(run_dir, config.tensorboard, after_step=start_step) if is_main else None
    tokens_per_step = config.batch_size * config.max_seq_length
    flops_per_step = training_flops_per_token(model, config.max_seq_length) * tokens_per_step
    peak = peak_flops(device)
    progress = make_progress(config, start_step, is_main)

    # --- The loop.
    done = start_step  # optimizer steps completed
    window = {"start": time.perf_counter(), "steps": 0, "sums": {}}
    # fp16's loss scaler skips steps whose gradients overflow, which is routine; in bf16 and fp32 a non-finite
    # loss or gradient means the run has diverged.
    watch = NonFiniteWatch(device) if config.precision != "fp16" else None

    def check_finite():
        if watch is not None:
            watch.check(complete_checkpoints(checkpoint_dir))

    def write_checkpoint():
        check_finite()
        if is_main:
            save_checkpoint(checkpoint_dir, done, training_state(done, model, optimizer, scheduler, scaler, config),
                            config.keep_checkpoints)

    try:
        for step in range(start_step, config.steps):
            model.train()
            step_losses = torch.zeros(len(NonFiniteWatch.LOSSES), device=device)
            for round_index in range(accumulation):
                micro_batch = rank * accumulation + round_index
                batch = to_device(data.train.batch(
                    schedule.micro_indices(step, micro_batch, world_size * accumulation)), device)
                torch.manual_seed(derived_seed(config.seed, TRAIN_STREAM, step, micro_batch))
                sync = round_index == accumulation - 1 or not distributed
                with autocast(), (contextlib.nullcontext() if sync else forward.no_sync()):
                    out = forward(**batch)
                    scaler.scale(out.loss / accumulation).backward()
                accumulate(window["sums"], out, accumulation)
                if watch is not None:
                    step_losses += torch.stack([getattr(out, name).detach().float()
                                                 for name in NonFiniteWatch.LOSSES]) / accumulation
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            if watch is not None:
                watch.observe(step + 1, step_losses, grad_norm)
            learning_rate = scheduler.get_last_lr()[0]  # this update's
            # From the update on, the step completes: its count, records and checkpoint go with its weights.
            with interrupts_deferred():
                scaler.step(optimizer)
                scaler.update()
                with warnings.catch_warnings():
                    # When the loss scaler skips the first update (fp16 overflows at its initial scale), torch warns
                    # that the schedule's first rate is lost. It is not: the rate is a function of the step count,
                    # which counts a skipped update like any other.
                    warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                window["steps"] += 1
                done = step + 1

                last = done == config.steps
                stopping = stop_after_step is not None and done >= stop_after_step
                logging_now = done % config.log_every == 0 or last
                evaluating_now = done % config.eval_every == 0 or last
                if logging_now or evaluating_now:  # write_checkpoint() checks too
                    check_finite()
                if logging_now:
                    values = finish_window(window, world_size)
                    elapsed = time.perf_counter() - window["start"]
                    values.update(grad_norm=float(grad_norm), learning_rate=learning_rate,
                                  tokens_per_second=window["steps"] * tokens_per_step / elapsed,
                                  epoch=schedule.epoch(done))
                    if peak:
                        values["mfu"] = window["steps"] * flops_per_step / elapsed / (peak * world_size)
                    if is_main:
                        log.write("train", done, values)
                        report(progress, config, done, values)
                    window = {"start": time.perf_counter(), "steps": 0, "sums": {}}
                if evaluating_now:
                    if is_main:
                        values = evaluate(model, data, config, device, autocast)
                        log.write("eval", done, values)
                        report(progress, config, done, values, evaluation=True)
                    barrier()
                if done % config.checkpoint_every == 0 or last or stopping:
                    write_checkpoint()
                    barrier()
                if stopping:
                    break
    except KeyboardInterrupt:
        # Keep the finished steps (a step interrupted before its optimizer update is redone on resume), unless
        # they diverged: write_checkpoint() raises TrainingDiverged then. A step just checkpointed is not saved
        # again: rewriting it would put its only complete copy at risk for nothing.
        if done > start_step and not is_complete(checkpoint_path(checkpoint_dir, done)):
            write_checkpoint()
        if done > start_step and is_main:
            print(f"\ninterrupted: checkpoint of step {done} in {checkpoint_dir}; continue with "
                  f"--resume --output-dir {run_dir}")
        raise
    finally:
        if progress is not None:
            progress.close()
        if log is not None:
            log.close()

    check_ranks_agree(model)

    # --- The results: HF-format exports, the joint model, the plots.
    if is_main and done >= config.steps:
        model.save_pretrained(os.path.join(run_dir, "model"))
        for part, save in (("discriminator", model.save_discriminator), ("generator", model.save_generator)):
            save(os.path.join(run_dir, part))
            save_for_transformers(data.tokenizer, os.path.join(run_dir, part),
                                  model_max_length=getattr(model.config, part).max_position_embeddings)
        plot_run(run_dir)
    barrier()
    return run_dir


# --- Helpers, in the order the loop uses them.

@contextlib.contextmanager
def interrupts_deferred():
    """Holds back a Ctrl-C (SIGINT) until the block is done, then raises it as KeyboardInterrupt; a second one
    raises at once. Around a step's update and bookkeeping: a Ctrl-C between the optimizer update and
    `done = step + 1` checkpointed updated weights and Adam moments under the previous step's number (the resumed
    run silently diverged), and one during the step's logging or evaluation lost that record."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread receives signals
        yield
        return
    received = []

    def hold(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received and callable(previous):  # Python's default handler raises KeyboardInterrupt
        previous(signal.SIGINT, None)

def shared_value(value):
    """Rank 0's value on every rank (the run directory's timestamp must not differ between ranks)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier():
    if dist.is_initialized():
        dist.barrier()


def check_ranks_agree(model):
    """DDP keeps every rank's weights equal; a per-parameter checksum compared across ranks proves it."""
    if not dist.is_initialized():
        return
    checksums = torch.stack([p.detach().double().sum() for p in model.parameters()])  # on the model's device
    gathered = [torch.empty_like(checksums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksums)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError("the ranks' weights differ after training: DDP replicas diverged")


def check_resumable(saved: TrainConfig, config: TrainConfig):
    """What decides the model and the data order must not change when a run resumes."""
    fixed = ("data", "vocab", "text_field", "preset", "sharing", "masking", "mask_prob", "gen_weight",
             "disc_weight", "temperature", "steps", "batch_size", "max_seq_length", "learning_rate", "warmup_steps",
             "weight_decay", "adam_betas", "adam_epsilon", "adam_bias_correction", "max_grad_norm", "precision",
             "seed")
    changed = [name for name in fixed if getattr(saved, name) != getattr(config, name)]
    if changed:
        raise ValueError("resume: these options differ from the run being resumed: " + ", ".join(
            f"{name} ({getattr(saved, name)!r} -> {getattr(config, name)!r})" for name in changed))


TRAIN_STREAM, EVAL_STREAM = 0, 1


def derived_seed(*keys: int) -> int:
    """A 32-bit seed that is a pure function of the keys (non-negative integers)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def to_device(batch: dict, device: torch.device) -> dict:
    return {name: torch.from_numpy(value).to(device, non_blocking=True) for name, value in batch.items()}


TRAIN_METRICS = ("loss", "mlm_loss", "rtd_loss")


def accumulate(sums: dict, out, accumulation: int):
    """Adds a micro-batch's losses and metrics (device tensors: no host sync until the window closes)."""
    values = {name: getattr(out, name).detach() for name in TRAIN_METRICS}
    values.update({name: value for name, value in out.metrics.items() if not name.startswith("num_")})
    for name, value in values.items():
        sums[name] = sums.get(name, 0.0) + value.float() / accumulation


def finish_window(window: dict, world_size: int) -> dict:
    """Means over the window's steps (and over ranks)."""
    names = sorted(window["sums"])
    stacked = torch.stack([window["sums"][name] for name in names]) / window["steps"]
    if dist.is_initialized():
        dist.all_reduce(stacked)
        stacked /= world_size
    return dict(zip(names, stacked.tolist()))


@torch.no_grad()
def evaluate(model, data, config: TrainConfig, device, autocast) -> dict:
    """Held-out metrics over up to eval_batches micro-batches, with fixed seeds so evaluations compare."""
    model.eval()
    sums = {"mlm_loss": 0.0, "mlm_correct": 0.0, "sampled_correct": 0.0, "masked": 0.0, "rtd_loss": 0.0,
            "tokens": 0.0}
    scores, labels = [], []
    size = config.micro_batch_size
    for index in range(min(config.eval_batches, math.ceil(len(data.eval) / size))):
        batch = to_device(data.eval.batch(np.arange(index * size, min(len(data.eval), (index + 1) * size))), device)
        torch.manual_seed(derived_seed(config.seed, EVAL_STREAM, index))
        with autocast():
            out = model(**batch)
        masked, tokens = out.metrics["num_masked"].item(), out.metrics["num_tokens"].item()
        sums["mlm_loss"] += out.mlm_loss.item() * masked
        sums["mlm_correct"] += out.metrics["mlm_accuracy"].item() * masked
        sums["sampled_correct"] += out.metrics["sampled_accuracy"].item() * masked
        sums["masked"] += masked
        sums["rtd_loss"] += out.rtd_loss.item() * tokens
        sums["tokens"] += tokens
        valid = batch["attention_mask"].bool()
        scores.append(out.disc_logits[valid].float().cpu())
        labels.append(out.replaced[valid].cpu())
    if not scores:
        return {}
    scores, labels = torch.cat(scores), torch.cat(labels)
    disc = discriminator_metrics(scores, labels, torch.ones_like(labels))
    return {
        "mlm_loss": sums["mlm_loss"] / max(sums["masked"], 1),
        "mlm_accuracy": sums["mlm_correct"] / max(sums["masked"], 1),
        "sampled_accuracy": sums["sampled_correct"] / max(sums["masked"], 1),
        "rtd_loss": sums["rtd_loss"] / max(sums["tokens"], 1),
        **{name: value.item() for name, value in disc.items() if name != "replaced_fraction"},
        "disc_auc": roc_auc(scores, labels),
        # Always answering "original": the accuracy the discriminator must beat.
        "trivial_disc_accuracy": 1.0 - disc["replaced_fraction"].item(),
    }


class TrainingDiverged(RuntimeError):
    """A loss or the gradient norm stopped being finite (bf16 or fp32): the run stops without checkpointing."""


class NonFiniteWatch:
    """Remembers, on the device, the first step whose losses or gradient norm were not finite, so that the loop
    keeps running ahead of the GPU (no host sync per step); `check` reads it before anything is logged or saved
    and raises TrainingDiverged naming that step and what went non-finite. Between a divergence and its check
    (at most log_every or checkpoint_every steps) the weights may turn NaN, but they are never written."""

    LOSSES = ("loss", "mlm_loss", "rtd_loss")
    NAMES = LOSSES + ("grad_norm",)

    def __init__(self, device: torch.device):
        self.first_step = torch.zeros((), dtype=torch.int64, device=device)  # 0: none yet (steps count from 1)
        self.values = torch.zeros(len(self.NAMES), device=device)

    def observe(self, step: int, losses: torch.Tensor, grad_norm: torch.Tensor):
        """losses: the step's LOSSES (means over its micro-batches); step: the step's number, from 1."""
        values = torch.cat([losses, grad_norm.detach().float().reshape(1)])
        first = (self.first_step == 0) & ~torch.isfinite(values).all()
        self.first_step = torch.where(first, step, self.first_step)
        self.values = torch.where(first, values, self.values)

    def check(self, checkpoints: list):
        step = int(self.first_step)
        if step == 0:
            return
        values = dict(zip(self.NAMES, self.values.tolist()))
        # The cause, not its consequences: a non-finite part makes the loss non-finite, which makes the gradients so.
        for causes in (("mlm_loss", "rtd_loss"), ("loss",), ("grad_norm",)):
            bad = [name for name in causes if not math.isfinite(values[name])]
            if bad:
                break
        newest = f"the newest checkpoint is {checkpoints[-1]}" if checkpoints else "there is no checkpoint yet"
        raise TrainingDiverged(
            f"step {step}: {' and '.join(bad)} {'is' if len(bad) == 1 else 'are'} not finite "
            f"({', '.join(f'{name} {value:.4g}' for name, value in values.items())}); training stopped without "
            f"writing a checkpoint of these weights; {newest}")


def training_state(step: int, model, optimizer, scheduler, scaler, config: TrainConfig) -> dict:
    """What a checkpoint holds: tensors and plain containers only (see train/checkpoint.py)."""
    for name, parameter in model.named_parameters():
        if not torch.isfinite(parameter).all():
            raise TrainingDiverged(f"step {step}: parameter {name} is not finite; no checkpoint written")
    return {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_states(),
            "train_config": config.to_dict()}


def restore_training_state(state: dict, model, optimizer, scheduler, scaler) -> int:
    """Loads a training_state into the run's objects; returns its step."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"])
    return state["step"]


def make_progress(config: TrainConfig, start_step: int, is_main: bool):
    if not is_main or config.quiet:
        return None
    from tqdm import tqdm

    return tqdm(total=config.steps, initial=start_step, desc=f"electra-{config.preset}", unit="step",
                dynamic_ncols=True)


def report(progress, config: TrainConfig, step: int, values: dict, evaluation: bool = False):
    if evaluation:
        line = (f"eval step {step}: mlm_loss {values.get('mlm_loss', float('nan')):.3f} "
                f"mlm_acc {values.get('mlm_accuracy', float('nan')):.3f} "
                f"disc_acc {values.get('disc_accuracy', float('nan')):.3f} "
                f"(trivial {values.get('trivial_disc_accuracy', float('nan')):.3f}) "
                f"auc {values.get('disc_auc', float('nan')):.3f}")
        (progress.write if progress is not None else print)(line)
        return
    shown = {"loss": f"{values['loss']:.3f}", "lr": f"{values['learning_rate']:.2e}",
             "tok/s": f"{values['tokens_per_second']:.0f}"}
    if "mfu" in values:
        shown["mfu"] = f"{values['mfu']:.1%}"
    if progress is not None:
        progress.set_postfix(shown, refresh=False)
        progress.update(step - progress.n)
    else:
        print(f"step {step}/{config.steps} " + " ".join(f"{k} {v}" for k, v in shown.items()), flush=True)
