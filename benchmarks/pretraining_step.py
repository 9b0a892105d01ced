"""One ELECTRA pre-training step (masking, generator, sampling, discriminator, backward, optimizer step), built
by each provider the step benchmark compares:

    electra_ext   ElectraForPretraining on its kernels (ops.attention, ops.gen_head, ops.disc_head)
    electra_ext_compiled
                  the same under torch.compile (`electra-ext pretrain --compile`): the kernels stay opaque
                  custom ops and inductor fuses the element-wise work between them (LayerNorm, GELU, residuals,
                  masking), which is what a launch-bound ELECTRA-Small step needs
    electra_ext_checkpointed
                  the same with gradient checkpointing (`--gradient-checkpointing`): each encoder layer recomputed
                  in the backward pass, for the batch that fits a memory budget (test_largest_batch)
    reference     the same model with every op on its pure-PyTorch reference (reference_path.py)
    hf_sdpa       HF transformers composed the way reproductions do it: ElectraForMaskedLM generator and
                  ElectraForPreTraining discriminator sharing one embeddings module, SDPA attention, the
                  generator's full [B, T, V] logits, the same masking (electra_ext's mask_tokens) and a
                  Gumbel-max draw at the masked positions
    hf_compiled   the same HF composition, its forward and loss under torch.compile

Every provider: the same batch, bf16 autocast on CUDA (fp32 on the CPU), the optimizer `electra-ext pretrain`
builds (AdamW, weight decay off for LayerNorm and biases) and gradient clipping at norm 1, as in
electra_ext/train/loop.py.
"""
import contextlib

import torch
import transformers
from torch import nn

from electra_ext.modules.pretraining import ElectraForPretraining, ElectraPretrainingConfig, mask_tokens
from electra_ext.train.config import TrainConfig
from electra_ext.train.optim import build_optimizer
from reference_path import reference_path

PROVIDERS = ("electra_ext", "electra_ext_compiled", "electra_ext_checkpointed", "reference", "hf_sdpa",
             "hf_compiled")
MAX_GRAD_NORM = 1.0  # TrainConfig's default


def hf_config(config, attn_implementation):
    return transformers.ElectraConfig(**{k: v for k, v in config.to_dict().items() if k != "model_type"},
                                      attn_implementation=attn_implementation)


class HFElectraPretraining(nn.Module):
    """ELECTRA's pre-training objective on HF transformers' models (electra_pytorch and lucidrains'
    electra-pytorch build it this way): tied embeddings, loss = gen_weight * MLM + disc_weight * RTD."""

    def __init__(self, config: ElectraPretrainingConfig, attn_implementation="sdpa"):
        super().__init__()
        self.config = config
        self.generator = transformers.ElectraForMaskedLM(hf_config(config.generator, attn_implementation))
        self.discriminator = transformers.ElectraForPreTraining(hf_config(config.discriminator, attn_implementation))
        self.discriminator.electra.embeddings = self.generator.electra.embeddings

    def forward(self, input_ids, attention_mask, token_type_ids):
        """attention_mask None: no padding, and the models get no mask (transformers' SDPA path may then use
        flash; an all-ones mask costs a host sync in eager mode and rules flash out under torch.compile)."""
        config = self.config
        batch = mask_tokens(input_ids, torch.ones_like(input_ids) if attention_mask is None else attention_mask,
                            config)
        labels = torch.full_like(input_ids, -100).scatter(1, batch.positions, batch.targets)
        generated = self.generator(batch.masked_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                   labels=labels)
        with torch.no_grad():
            rows = generated.logits.gather(
                1, batch.positions.unsqueeze(-1).expand(-1, -1, generated.logits.shape[-1])).float()
            # Gumbel-max: argmax(logits / temperature + G), G = -log(E) with E ~ Exponential(1).
            samples = (rows / config.temperature - torch.empty_like(rows).exponential_().log()).argmax(-1)
            originals = input_ids.gather(1, batch.positions)
            corrupted = input_ids.scatter(1, batch.positions, torch.where(batch.targets != -100, samples, originals))
            replaced = (corrupted != input_ids).long()
        detected = self.discriminator(corrupted, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                      labels=replaced)
        return config.gen_weight * generated.loss + config.disc_weight * detected.loss


def pretraining_config(preset_name: str) -> ElectraPretrainingConfig:
    """The preset with dropout as pre-training uses it (0.1)."""
    return ElectraPretrainingConfig.from_preset(preset_name)


def build_model(provider: str, preset_name: str, device: str) -> nn.Module:
    config = pretraining_config(preset_name)
    if provider.startswith("hf_"):
        return HFElectraPretraining(config).to(device)
    model = ElectraForPretraining(config).to(device)
    if provider == "electra_ext_checkpointed":
        model.gradient_checkpointing_enable()
    return model


def make_batch(preset_name: str, batch_size: int, seq_len: int, device: str, seed: int = 0) -> dict:
    """Full-length sequences ([CLS] ... [SEP], no padding, as pre-training packs them) of random word-piece ids;
    attention_mask None, so that each provider takes its fastest path for an unpadded batch."""
    config = pretraining_config(preset_name)
    generator = torch.Generator().manual_seed(seed)
    # 1000 and up: past BERT's [unused] and special tokens.
    input_ids = torch.randint(1000, config.discriminator.vocab_size, (batch_size, seq_len), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = config.cls_token_id, config.sep_token_id
    return {"input_ids": input_ids.to(device), "attention_mask": None,
            "token_type_ids": torch.zeros_like(input_ids, device=device)}


class TrainingStep:
    """step(batch): one full training step of `provider`. Holds the model and the optimizer."""

    def __init__(self, provider: str, preset_name: str, device: str):
        if provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
        torch.manual_seed(0)
        self.model = build_model(provider, preset_name, device).train()
        self.forward = self.model
        if provider.endswith("_compiled"):
            # Dynamo remembers the shapes it compiled process-wide, and recompiles a new batch size with a symbolic
            # batch: without the reset a step compiled after another step's (the next shape) would be timed on
            # dynamic-shape graphs. The first compile after it is static.
            torch._dynamo.reset()
            self.forward = torch.compile(self.model)
        self.loss = (lambda out: out) if provider.startswith("hf_") else (lambda out: out.loss)
        train_config = TrainConfig(preset=preset_name, device=device).resolve()
        self.optimizer = build_optimizer(self.model, train_config)
        self.ops = reference_path if provider == "reference" else contextlib.nullcontext
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" \
            else contextlib.nullcontext

    def __call__(self, batch: dict):
        with self.ops():
            with self.autocast():
                loss = self.loss(self.forward(**batch))
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


