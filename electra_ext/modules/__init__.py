"""nn.Modules built on electra_ext.ops, with HF transformers' parameter names, and their configuration."""
from electra_ext.modules.config import PRESETS, ElectraConfig, ElectraPreset, preset
from electra_ext.modules.discriminator_head import DiscriminatorHead
from electra_ext.modules.electra import (
    DiscriminatorOutput,
    ElectraDiscriminator,
    ElectraEmbeddings,
    ElectraEncoder,
    ElectraGenerator,
    ElectraModel,
    MaskedLMOutput,
    count_parameters,
)
from electra_ext.modules.gdes import GradientDisentangledEmbedding
from electra_ext.modules.pretraining import (
    ElectraForPretraining,
    ElectraPretrainingConfig,
    ElectraPretrainingOutput,
    MaskedBatch,
    mask_tokens,
)

__all__ = ["PRESETS", "DiscriminatorHead", "DiscriminatorOutput", "ElectraConfig", "ElectraDiscriminator",
           "ElectraEmbeddings", "ElectraEncoder", "ElectraForPretraining", "ElectraGenerator", "ElectraModel",
           "ElectraPreset", "ElectraPretrainingConfig", "ElectraPretrainingOutput", "GradientDisentangledEmbedding",
           "MaskedBatch", "MaskedLMOutput", "count_parameters", "mask_tokens", "preset"]
