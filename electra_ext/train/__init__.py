"""The pre-training loop (`pretrain`) and its configuration (`TrainConfig`)."""
from electra_ext.train.config import TrainConfig
from electra_ext.train.loop import pretrain

__all__ = ["TrainConfig", "pretrain"]
