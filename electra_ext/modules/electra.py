"""The ELECTRA transformer and its two pre-training models, with HF transformers' module and parameter names.

`ElectraDiscriminator` has exactly the state-dict keys of HF `ElectraForPreTraining`, `ElectraGenerator`
those of HF `ElectraForMaskedLM`, so weights move both ways unchanged (see electra_ext/modules/hf_io.py).
The architecture is BERT's post-LN encoder as ELECTRA's reference code builds it: embeddings
LN(word + type + position) -> dropout -> `embeddings_project` (only when embedding size != hidden size) ->
layers of [attention -> dense -> dropout -> LN(+residual)] -> [dense -> GELU -> dense -> dropout ->
LN(+residual)], GELU in erf form, LayerNorm eps 1e-12 computed in float32.

Attention goes through `electra_ext.ops.attention_qkvpacked`, the discriminator head through `ops.disc_head` and the
generator head, in pre-training, through `ops.gen_head` on the masked rows only.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from electra_ext.modules.config import ElectraConfig
from electra_ext.modules.discriminator_head import DiscriminatorHead
from electra_ext.modules.gdes import GradientDisentangledEmbedding
from electra_ext.modules.hf_io import HFCheckpointMixin
from electra_ext.ops import GenHeadOutput, attention_qkvpacked, gen_head
from electra_ext.ops.backend import has_values
from electra_ext.ops.reference import key_padding_mask


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose math is float32 whatever the input dtype: eps 1e-12 underflows in float16."""

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class ElectraEmbeddings(nn.Module):
    """LN(word + token type + position embeddings), then dropout. With `disentangled_from` (GDES sharing), the
    three tables are that module's tables detached plus residuals of this module; the LayerNorm is its own."""

    def __init__(self, config: ElectraConfig, disentangled_from: Optional["ElectraEmbeddings"] = None):
        super().__init__()
        if disentangled_from is None:
            self.word_embeddings = nn.Embedding(config.vocab_size, config.embedding_size,
                                                padding_idx=config.pad_token_id)
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.embedding_size)
            self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.embedding_size)
        else:
            self.word_embeddings = GradientDisentangledEmbedding(disentangled_from.word_embeddings)
            self.position_embeddings = GradientDisentangledEmbedding(disentangled_from.position_embeddings)
            self.token_type_embeddings = GradientDisentangledEmbedding(disentangled_from.token_type_embeddings)
        self.LayerNorm = LayerNorm(config.embedding_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        embeddings = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        embeddings = embeddings + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(embeddings))


class ElectraSelfAttention(nn.Module):
    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.dropout_p = config.attention_probs_dropout_prob
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states, seqlens):
        batch, seq_len, hidden = hidden_states.shape
        # One [3H, H] projection instead of three, its output read in place by the attention kernels, which write
        # its gradient as one tensor too; the weight concatenation copies 3H² values, nothing next to the B·T·3H
        # activations.
        qkv = F.linear(hidden_states, torch.cat((self.query.weight, self.key.weight, self.value.weight)),
                       torch.cat((self.query.bias, self.key.bias, self.value.bias)))
        context = attention_qkvpacked(qkv.view(batch, seq_len, 3, self.num_heads, self.head_dim), seqlens=seqlens,
                                      dropout_p=self.dropout_p if self.training else 0.0)
        return context.reshape(batch, seq_len, hidden)


class ElectraSelfOutput(nn.Module):
    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, residual):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class ElectraAttention(nn.Module):
    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.self = ElectraSelfAttention(config)
        self.output = ElectraSelfOutput(config)

    def forward(self, hidden_states, seqlens):
        return self.output(self.self(hidden_states, seqlens), hidden_states)


class ElectraIntermediate(nn.Module):
    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, hidden_states):
        return F.gelu(self.dense(hidden_states))


class ElectraOutput(ElectraSelfOutput):
    def __init__(self, config: ElectraConfig):
        super().__init__(config)
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)


class ElectraLayer(nn.Module):
    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.attention = ElectraAttention(config)
        self.intermediate = ElectraIntermediate(config)
        self.output = ElectraOutput(config)

    def forward(self, hidden_states, seqlens):
        attended = self.attention(hidden_states, seqlens)
        return self.output(self.intermediate(attended), attended)


class ElectraEncoder(nn.Module):
    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.layer = nn.ModuleList(ElectraLayer(config) for _ in range(config.num_hidden_layers))
        self.checkpoint_options = None  # torch.utils.checkpoint's options while gradient checkpointing is on

    def forward(self, hidden_states, seqlens):
        recompute = self.checkpoint_options is not None and self.training and torch.is_grad_enabled()
        for layer in self.layer:
            if recompute:
                hidden_states = checkpoint(layer, hidden_states, seqlens, **self.checkpoint_options)
            else:
                hidden_states = layer(hidden_states, seqlens)
        return hidden_states


class GradientCheckpointing:
    """HF's gradient checkpointing switches, for the models built on ElectraEncoder. While it is on, each encoder
    layer keeps only its input for the backward pass and runs its forward again there (in training mode, with
    gradients): one more forward pass per step, for a quarter to a tenth of the memory (ELECTRA-Small, 32 x 128
    tokens, on the CPU: a step's peak above the resting model 460-570 -> 50-170 MiB, benchmarks/NOTES.md). The
    recomputation restores the RNG state, so dropout and the attention's dropout draw the same masks and the
    gradients are bitwise the same."""

    supports_gradient_checkpointing = True  # what transformers' PreTrainedModel says when it has the switches

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None):
        """gradient_checkpointing_kwargs: torch.utils.checkpoint.checkpoint's options (default use_reentrant=False,
        which torch recommends)."""
        options = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        for module in self.modules():
            if isinstance(module, ElectraEncoder):
                module.checkpoint_options = options

    def gradient_checkpointing_disable(self):
        for module in self.modules():
            if isinstance(module, ElectraEncoder):
                module.checkpoint_options = None

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(module.checkpoint_options is not None for module in self.modules()
                   if isinstance(module, ElectraEncoder))


def seqlens_from_attention_mask(attention_mask, input_ids):
    """[B] int32 valid lengths from an HF-style attention mask (1 = token, 0 = padding at the end). None
    means no padding. Any other mask is refused: the kernels would read it as that many leading tokens."""
    if attention_mask is None:
        return None
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    keep = attention_mask != 0
    seqlens = keep.sum(dim=1, dtype=torch.int32)
    prefix = key_padding_mask(seqlens, keep.shape[1])
    message = ("attention_mask must be 1 on a prefix of each sequence and 0 after it (padding at the end, as HF "
               "tokenizers pad by default); left or interior padding is not supported")
    if torch.compiler.is_compiling():
        # A compiled graph does not read the mask on the host: the check runs on the device, a RuntimeError on the
        # CPU and a device-side assert on a GPU (as a compiled embedding's out-of-range id is).
        torch._assert_async(torch.eq(keep, prefix).all(), message)
    elif has_values(keep) and not torch.equal(keep, prefix):
        raise ValueError(message)
    return seqlens


def check_ids_in_range(input_ids, token_type_ids, config: ElectraConfig):
    """An id outside its embedding table would be an IndexError on the CPU and an illegal memory access (a dead
    CUDA context) on the GPU: a ValueError instead, at the cost of one host read of four numbers."""
    if not input_ids.numel():
        return
    low, high, type_low, type_high = torch.stack([input_ids.min(), input_ids.max(), token_type_ids.min(),
                                                  token_type_ids.max()]).tolist()
    for name, size_name, size, first, last in (("input_ids", "vocab_size", config.vocab_size, low, high),
                                               ("token_type_ids", "type_vocab_size", config.type_vocab_size,
                                                type_low, type_high)):
        if first < 0 or last >= size:
            raise ValueError(f"{name} must lie in [0, {size_name}={size}), got values from {first} to {last}")


class ElectraModel(GradientCheckpointing, nn.Module):
    """Embeddings, the optional E->H projection and the encoder (HF's `ElectraModel`, the `electra.` prefix).
    `embeddings` lets two models share one embeddings module (ELECTRA's tied sharing)."""

    def __init__(self, config: ElectraConfig, embeddings: Optional[nn.Module] = None):
        super().__init__()
        if not isinstance(config, ElectraConfig):
            raise TypeError(f"config must be an electra_ext.ElectraConfig, got {type(config).__module__}."
                            f"{type(config).__qualname__} (from a transformers.ElectraConfig: "
                            f"electra_ext.ElectraConfig.from_dict(config.to_dict()))")
        self.config = config
        if embeddings is None:
            embeddings = ElectraEmbeddings(config)
            initialize_weights(embeddings, config)
        self.embeddings = embeddings
        if config.embedding_size != config.hidden_size:
            self.embeddings_project = nn.Linear(config.embedding_size, config.hidden_size)
            initialize_glorot(self.embeddings_project)
        self.encoder = ElectraEncoder(config)
        initialize_weights(self.encoder, config)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """Returns (last hidden states [B, T, H], seqlens [B] int32 or None)."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be an integer tensor [batch, seq], got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        if not 1 <= input_ids.shape[1] <= self.config.max_position_embeddings:
            raise ValueError(f"input_ids' sequence length must be in [1, max_position_embeddings="
                             f"{self.config.max_position_embeddings}], got {input_ids.shape[1]}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        elif token_type_ids.shape != input_ids.shape:
            raise ValueError(f"token_type_ids must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(token_type_ids.shape)}")
        if has_values(input_ids):
            check_ids_in_range(input_ids, token_type_ids, self.config)
        seqlens = seqlens_from_attention_mask(attention_mask, input_ids)
        hidden_states = self.embeddings(input_ids, token_type_ids)
        if hasattr(self, "embeddings_project"):
            hidden_states = self.embeddings_project(hidden_states)
        return self.encoder(hidden_states, seqlens), seqlens


def initialize_weights(module: nn.Module, config: ElectraConfig):
    """The reference code's initialisation of every layer in `module`: truncated normal (σ =
    initializer_range, cut at 2σ like TF's truncated_normal) for dense layers and embedding tables, zero
    biases, LayerNorm (1, 0), zero GDES residuals. The padding row is zeroed, as HF does. The two layers the
    reference code gives Glorot-uniform (`embeddings_project`, the H->1 layer) are set by their owners."""
    std = config.initializer_range
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
        if isinstance(layer, nn.Linear) and layer.bias is not None:
            nn.init.zeros_(layer.bias)
        if isinstance(layer, nn.Embedding) and layer.padding_idx is not None:
            with torch.no_grad():
                layer.weight[layer.padding_idx].zero_()
        if isinstance(layer, nn.LayerNorm):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
        if isinstance(layer, GradientDisentangledEmbedding):
            nn.init.zeros_(layer.residual)


def initialize_glorot(linear: nn.Linear):
    nn.init.xavier_uniform_(linear.weight)
    nn.init.zeros_(linear.bias)


class DiscriminatorOutput(NamedTuple):
    loss: Optional[torch.Tensor]  # mean BCE over non-padding tokens, when labels were given
    logits: torch.Tensor          # [B, T] float32, one logit per token ("replaced")
    last_hidden_state: torch.Tensor


class MaskedLMOutput(NamedTuple):
    loss: Optional[torch.Tensor]  # mean cross-entropy over labels != -100, when labels were given
    logits: torch.Tensor          # [B, T, V]
    last_hidden_state: torch.Tensor


class ElectraDiscriminator(GradientCheckpointing, HFCheckpointMixin, nn.Module):
    """Replaced-token detection: HF `ElectraForPreTraining`'s modules and state-dict keys."""

    HF_ARCHITECTURE = "ElectraForPreTraining"

    def __init__(self, config: ElectraConfig, embeddings: Optional[nn.Module] = None):
        super().__init__()
        self.config = config
        self.electra = ElectraModel(config, embeddings)
        self.discriminator_predictions = DiscriminatorHead(config.hidden_size)
        initialize_weights(self.discriminator_predictions, config)
        initialize_glorot(self.discriminator_predictions.dense_prediction)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        """labels: [B, T], 1 (or True) where the token was replaced. Returns DiscriminatorOutput."""
        hidden_states, seqlens = self.electra(input_ids, attention_mask, token_type_ids)
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        if labels is not None and labels.is_floating_point() and has_values(labels) and bool(
                ((labels != 0) & (labels != 1)).any()):
            raise ValueError("labels must be 0 (original) or 1 (replaced); soft labels are not supported")
        replaced = torch.zeros_like(input_ids, dtype=torch.bool) if labels is None else labels != 0
        valid = (torch.ones_like(replaced) if seqlens is None
                 else key_padding_mask(seqlens, input_ids.shape[1]))
        logits, loss = self.discriminator_predictions(hidden_states, replaced, valid)
        return DiscriminatorOutput(None if labels is None else loss, logits, hidden_states)


class GeneratorPredictions(nn.Module):
    """dense(H->E) -> GELU -> LayerNorm(E): HF's `ElectraGeneratorPredictions`."""

    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.LayerNorm = LayerNorm(config.embedding_size, eps=config.layer_norm_eps)
        self.dense = nn.Linear(config.hidden_size, config.embedding_size)

    def forward(self, hidden_states):
        return self.LayerNorm(F.gelu(self.dense(hidden_states)))


class ElectraGenerator(GradientCheckpointing, HFCheckpointMixin, nn.Module):
    """The masked-LM generator: HF `ElectraForMaskedLM`'s modules and state-dict keys. Its output layer is
    tied to its word embeddings (`generator_lm_head.weight` is `electra.embeddings.word_embeddings.weight`)."""

    HF_ARCHITECTURE = "ElectraForMaskedLM"

    def __init__(self, config: ElectraConfig, embeddings: Optional[nn.Module] = None):
        super().__init__()
        self.config = config
        self.electra = ElectraModel(config, embeddings)
        self.generator_predictions = GeneratorPredictions(config)
        initialize_weights(self.generator_predictions, config)
        self.generator_lm_head = nn.Linear(config.embedding_size, config.vocab_size)
        nn.init.zeros_(self.generator_lm_head.bias)
        self.generator_lm_head.weight = self.electra.embeddings.word_embeddings.weight

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        """HF-compatible: logits for every position [B, T, V]. labels: [B, T] token ids, -100 where ignored.
        Pre-training uses `masked_lm`, which never forms the [B, T, V] logits."""
        hidden_states, _ = self.electra(input_ids, attention_mask, token_type_ids)
        logits = self.generator_lm_head(self.generator_predictions(hidden_states))
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)}, "
                                 f"got {tuple(labels.shape)}")
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return MaskedLMOutput(loss, logits, hidden_states)

    def masked_lm(self, input_ids, attention_mask, token_type_ids, positions, targets, *, temperature=1.0,
                  disallow_correct=False, generator=None) -> GenHeadOutput:
        """The generator head only at `positions` [B, P] (targets [B, P]: original ids, -100 for unused
        slots), through ops.gen_head: mean cross-entropy, Gumbel-max samples [B·P], per-row log-sum-exp and
        the argmax-correct count."""
        hidden_states, _ = self.electra(input_ids, attention_mask, token_type_ids)
        rows = hidden_states.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1]))
        transformed = self.generator_predictions(rows).flatten(0, 1)
        device = transformed.device.type
        if torch.is_autocast_enabled(device):
            # What F.linear does under autocast (the LayerNorm before it returns float32): the head's products in
            # the autocast dtype, which is what the CUDA kernels take.
            transformed = transformed.to(torch.get_autocast_dtype(device))
        return gen_head(transformed, self.generator_lm_head.weight, self.generator_lm_head.bias,
                        targets.flatten(), temperature=temperature, generator=generator,
                        disallow_correct=disallow_correct)


def count_parameters(model: nn.Module) -> int:
    """Distinct trainable parameters (a tied or shared tensor counts once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["ElectraDiscriminator", "ElectraEmbeddings", "ElectraEncoder", "ElectraGenerator", "ElectraModel",
           "GradientCheckpointing", "GradientDisentangledEmbedding", "LayerNorm", "count_parameters",
           "initialize_glorot", "initialize_weights", "seqlens_from_attention_mask"]
