"""ElectraForPretraining: generator and discriminator trained together on replaced-token detection.

One step, as the reference code does it (Clark et al. 2020, google-research/electra):
1. mask: per sequence, k = max(1, min(P, round(mask_prob · non-pad tokens))) positions, drawn without
   replacement among non-pad tokens other than [CLS]/[SEP]/[MASK]; P = int((mask_prob + 0.005) · T) is the
   fixed number of prediction slots (19 at T = 128), which keeps every shape static. Of the chosen
   positions 85% become [MASK] and 15% stay as they are ("electra"), or BERT's 80% [MASK] / 10% random
   token / 10% unchanged ("bert").
2. the generator predicts the original token at the chosen positions only (ops.gen_head: no [B, T, V]
   logits), and draws a replacement by Gumbel-max at `temperature`, without gradient through the draw.
3. the corrupted input carries the draw at every chosen position; a token is "replaced" when the draw
   differs from the original (a correct draw counts as real).
4. the discriminator classifies every token; its loss is the mean BCE over non-pad tokens.
loss = gen_weight · MLM + disc_weight · RTD (1 and 50).

Embedding sharing (`sharing`): "tied" (the reference default: the generator and the discriminator hold one
embeddings module: word, position and type tables and the embedding LayerNorm; the generator's output layer
is the word table), "untied" (each its own), "gdes" (the discriminator sees the generator's tables detached
plus its own zero-initialised residuals, so the RTD loss never moves the shared tables).
"""
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from electra_ext._io import atomic_output
from electra_ext.modules.config import ElectraConfig, ElectraPreset, preset
from electra_ext.modules.electra import (ElectraDiscriminator, ElectraEmbeddings, ElectraGenerator,
                                         GradientCheckpointing, initialize_weights)
from electra_ext.modules.hf_io import check_directory, load_weights, save_weights, without_aliases
from electra_ext.ops.reference import generator_kwargs

SHARING_MODES = ("tied", "untied", "gdes")
MASKING_MODES = ("electra", "bert")
PRETRAINING_CONFIG_NAME = "electra_ext_pretraining.json"


@dataclass(frozen=True)
class ElectraPretrainingConfig:
    """The two models and the replaced-token-detection task. Token ids default to BERT's uncased vocabulary."""

    discriminator: ElectraConfig
    generator: ElectraConfig
    sharing: str = "tied"
    mask_prob: float = 0.15
    masking: str = "electra"
    temperature: float = 1.0
    disallow_correct: bool = False
    gen_weight: float = 1.0
    disc_weight: float = 50.0
    cls_token_id: int = 101
    sep_token_id: int = 102
    mask_token_id: int = 103

    def __post_init__(self):
        if self.sharing not in SHARING_MODES:
            raise ValueError(f"sharing must be one of {', '.join(SHARING_MODES)}, got {self.sharing!r}")
        if self.masking not in MASKING_MODES:
            raise ValueError(f"masking must be one of {', '.join(MASKING_MODES)}, got {self.masking!r}")
        if not 0.0 < self.mask_prob < 0.99:
            raise ValueError(f"mask_prob must be in (0, 0.99), got {self.mask_prob!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature!r}")
        if self.gen_weight < 0 or self.disc_weight < 0:
            raise ValueError(f"gen_weight and disc_weight must be non-negative, got {self.gen_weight!r}, "
                             f"{self.disc_weight!r}")
        d, g = self.discriminator, self.generator
        for name in ("vocab_size", "pad_token_id"):
            if getattr(d, name) != getattr(g, name):
                raise ValueError(f"generator and discriminator must have the same {name}, got "
                                 f"{getattr(g, name)} and {getattr(d, name)}")
        if self.sharing != "untied":
            for name in ("embedding_size", "max_position_embeddings", "type_vocab_size"):
                if getattr(d, name) != getattr(g, name):
                    raise ValueError(f"sharing={self.sharing!r} needs the same {name} in generator and "
                                     f"discriminator, got {getattr(g, name)} and {getattr(d, name)}")
        for name in ("cls_token_id", "sep_token_id", "mask_token_id"):
            if not 0 <= getattr(self, name) < d.vocab_size:
                raise ValueError(f"{name} must be in [0, vocab_size={d.vocab_size}), got {getattr(self, name)!r}")

    @classmethod
    def from_preset(cls, name, **changes) -> "ElectraPretrainingConfig":
        """The preset's discriminator, generator and mask probability, with `changes` applied."""
        chosen = name if isinstance(name, ElectraPreset) else preset(name)
        return cls(discriminator=chosen.discriminator, generator=chosen.generator,
                   **{"mask_prob": chosen.mask_prob, **changes})

    def prediction_slots(self, seq_len: int) -> int:
        """P: the fixed number of masked positions per sequence of length seq_len (the reference code's
        max_predictions_per_seq = int((mask_prob + 0.005) · seq_len))."""
        return max(1, min(seq_len, int((self.mask_prob + 0.005) * seq_len)))

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["discriminator"], values["generator"] = self.discriminator.to_dict(), self.generator.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "ElectraPretrainingConfig":
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown ElectraPretrainingConfig fields {unknown}")
        return cls(**{**values, "discriminator": ElectraConfig.from_dict(values["discriminator"]),
                      "generator": ElectraConfig.from_dict(values["generator"])})


class MaskedBatch(NamedTuple):
    masked_ids: torch.Tensor  # [B, T] the generator's input
    positions: torch.Tensor   # [B, P] int64 prediction slots (distinct positions per row)
    targets: torch.Tensor     # [B, P] int64 original ids, -100 on unused slots
    selected: torch.Tensor    # [B, T] bool, the chosen positions


def mask_tokens(input_ids, attention_mask, config: ElectraPretrainingConfig, generator=None) -> MaskedBatch:
    """Step 1 of the module docstring. attention_mask: [B, T] (1 token, 0 padding)."""
    batch, seq_len = input_ids.shape
    random = generator_kwargs(generator)
    slots = config.prediction_slots(seq_len)
    valid = attention_mask != 0
    candidates = valid & (input_ids != config.discriminator.pad_token_id)
    for special in (config.cls_token_id, config.sep_token_id, config.mask_token_id):
        candidates &= input_ids != special
    wanted = torch.round(config.mask_prob * valid.sum(dim=1).double()).long().clamp(1, slots)
    count = torch.minimum(wanted, candidates.sum(dim=1))
    # Without replacement: the `count` candidates with the smallest uniform scores (non-candidates score 2).
    scores = torch.rand((batch, seq_len), device=input_ids.device, **random)
    scores = scores.masked_fill(~candidates, 2.0)
    positions = torch.topk(scores, slots, dim=1, largest=False).indices
    used = torch.arange(slots, device=input_ids.device) < count.unsqueeze(1)
    targets = torch.where(used, input_ids.gather(1, positions), torch.full_like(positions, -100))
    selected = torch.zeros_like(candidates).scatter(1, positions, used)

    action = torch.rand((batch, seq_len), device=input_ids.device, **random)
    masked_ids = input_ids.masked_fill(selected & (action < (0.85 if config.masking == "electra" else 0.8)),
                                       config.mask_token_id)
    if config.masking == "bert":
        random_tokens = torch.randint(config.discriminator.vocab_size, input_ids.shape, device=input_ids.device,
                                      dtype=input_ids.dtype, **random)
        masked_ids = torch.where(selected & (action >= 0.8) & (action < 0.9), random_tokens, masked_ids)
    return MaskedBatch(masked_ids, positions, targets, selected)


class ElectraPretrainingOutput(NamedTuple):
    loss: torch.Tensor            # gen_weight · mlm_loss + disc_weight · rtd_loss
    mlm_loss: torch.Tensor        # generator: mean cross-entropy over the masked positions
    rtd_loss: torch.Tensor        # discriminator: mean BCE over non-pad tokens
    disc_logits: torch.Tensor     # [B, T] float32
    corrupted_ids: torch.Tensor   # [B, T] the discriminator's input
    replaced: torch.Tensor        # [B, T] bool, the discriminator's labels
    metrics: dict                 # name -> 0-dim float tensor, detached (no host sync)


def discriminator_metrics(disc_logits, replaced, valid) -> dict:
    """The discriminator's accuracy, precision and recall ("replaced" is positive), and the replaced
    fraction, over the tokens where `valid`."""
    predicted = disc_logits > 0
    true_positive = (predicted & replaced & valid).sum()
    num_valid = valid.sum().clamp_min(1)
    return {
        "disc_accuracy": ((predicted == replaced) & valid).sum() / num_valid,
        "disc_precision": true_positive / (predicted & valid).sum().clamp_min(1),
        "disc_recall": true_positive / (replaced & valid).sum().clamp_min(1),
        "replaced_fraction": (replaced & valid).sum() / num_valid,
    }


def rtd_metrics(num_correct, samples, targets, disc_logits, replaced, valid) -> dict:
    """MLM accuracy (argmax), sampled-token accuracy, the discriminator's metrics over non-pad tokens, and
    the counts of masked and non-pad tokens."""
    counted = targets != -100
    num_masked = counted.sum().clamp_min(1)
    return {
        "mlm_accuracy": num_correct / num_masked,
        "sampled_accuracy": ((samples == targets) & counted).sum() / num_masked,
        **discriminator_metrics(disc_logits, replaced, valid),
        "num_masked": counted.sum().float(),  # counts, to weight averages over batches
        "num_tokens": valid.sum().float(),
    }


class ElectraForPretraining(GradientCheckpointing, nn.Module):
    """The joint model. `ElectraForPretraining("small")`, `ElectraForPretraining("tiny", sharing="gdes")` or
    `ElectraForPretraining(ElectraPretrainingConfig(...))`."""

    def __init__(self, config="small", **changes):
        super().__init__()
        if not isinstance(config, ElectraPretrainingConfig):
            config = ElectraPretrainingConfig.from_preset(config, **changes)
        elif changes:
            config = dataclasses.replace(config, **changes)
        self.config = config
        self.generator = ElectraGenerator(config.generator)
        generator_embeddings = self.generator.electra.embeddings
        if config.sharing == "tied":
            discriminator_embeddings = generator_embeddings
        elif config.sharing == "gdes":
            discriminator_embeddings = ElectraEmbeddings(config.discriminator, disentangled_from=generator_embeddings)
            initialize_weights(discriminator_embeddings, config.discriminator)
        else:
            discriminator_embeddings = None
        self.discriminator = ElectraDiscriminator(config.discriminator, discriminator_embeddings)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, generator=None):
        """input_ids, attention_mask, token_type_ids: [B, T] as for HF models (attention_mask None: no
        padding). generator: torch.Generator for masking and sampling (torch's default one when None).
        Returns ElectraPretrainingOutput."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        config = self.config
        batch = mask_tokens(input_ids, attention_mask, config, generator)
        head = self.generator.masked_lm(batch.masked_ids, attention_mask, token_type_ids, batch.positions,
                                        batch.targets, temperature=config.temperature,
                                        disallow_correct=config.disallow_correct, generator=generator)
        samples = head.samples.view_as(batch.positions).to(input_ids.dtype)
        originals = input_ids.gather(1, batch.positions)
        corrupted = input_ids.scatter(1, batch.positions, torch.where(batch.targets != -100, samples, originals))
        replaced = corrupted != input_ids
        disc = self.discriminator(corrupted, attention_mask, token_type_ids, labels=replaced)
        loss = config.gen_weight * head.loss + config.disc_weight * disc.loss
        with torch.no_grad():
            metrics = rtd_metrics(head.num_correct, samples.flatten(), batch.targets.flatten(), disc.logits,
                                  replaced, attention_mask != 0)
        return ElectraPretrainingOutput(loss, head.loss, disc.loss, disc.logits, corrupted, replaced, metrics)

    def save_pretrained(self, path: str) -> str:
        """The whole joint model in one directory: electra_ext_pretraining.json and model.safetensors (shared
        tensors stored once)."""
        os.makedirs(path, exist_ok=True)
        save_weights(self.state_dict(), path)
        with atomic_output(os.path.join(path, PRETRAINING_CONFIG_NAME), "w") as f:
            json.dump(self.config.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        return path

    @classmethod
    def from_pretrained(cls, path: str) -> "ElectraForPretraining":
        """Loads a directory written by save_pretrained."""
        file = os.path.join(check_directory(path), PRETRAINING_CONFIG_NAME)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no {PRETRAINING_CONFIG_NAME} in {path!r}: not an ElectraForPretraining "
                                    f"directory (load HF discriminators/generators with ElectraDiscriminator/"
                                    f"ElectraGenerator.from_pretrained)")
        with open(file) as f:
            model = cls(ElectraPretrainingConfig.from_dict(json.load(f)))
        state = load_weights(path)
        expected = model.state_dict()
        aliases = set(expected) - set(without_aliases(expected))
        missing = sorted(set(expected) - set(state) - aliases)
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not match the config: missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]}")
        model.load_state_dict(state, strict=False)
        return model

    def save_discriminator(self, path: str) -> str:
        """An HF `ElectraForPreTraining` directory with a full copy of the (shared) embeddings."""
        return self.discriminator.save_pretrained(path)

    def save_generator(self, path: str) -> str:
        """An HF `ElectraForMaskedLM` directory with a full copy of the (shared) embeddings."""
        return self.generator.save_pretrained(path)
