"""electra_ext: fused CPU/CUDA kernels and modules for fast ELECTRA pre-training."""
from electra_ext._extension import BUILD_INFO
from electra_ext import ops, modules
from electra_ext.modules import (
    PRESETS,
    ElectraConfig,
    ElectraDiscriminator,
    ElectraEmbeddings,
    ElectraEncoder,
    ElectraForPretraining,
    ElectraGenerator,
    ElectraModel,
    ElectraPreset,
    ElectraPretrainingConfig,
    preset,
)

__version__ = "0.1.0"
__all__ = ["BUILD_INFO", "PRESETS", "ElectraConfig", "ElectraDiscriminator", "ElectraEmbeddings", "ElectraEncoder",
           "ElectraForPretraining", "ElectraGenerator", "ElectraModel", "ElectraPreset", "ElectraPretrainingConfig",
           "modules", "ops", "preset", "__version__"]
