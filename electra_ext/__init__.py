"""electra_ext: fused CPU/CUDA kernels and modules for fast ELECTRA pre-training."""
from electra_ext._extension import BUILD_INFO
from electra_ext import ops, modules

__version__ = "0.1.0"
__all__ = ["BUILD_INFO", "ops", "modules", "__version__"]
