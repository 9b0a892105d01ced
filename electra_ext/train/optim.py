"""The optimizer and learning-rate schedule of ELECTRA's reference code.

Weight decay 0.01 on every weight except LayerNorm weights and biases. `adam_bias_correction=True` (the
default) is torch's AdamW; False is the reference code's Adam without bias correction, whose early steps are
larger: m and v start at zero and are not rescaled by 1 / (1 - beta^t), and v's deficit is the larger one. With
a constant gradient its update is (1 - 0.9^t) / sqrt(1 - 0.999^t) times AdamW's: 3.2x at step 1, 6.5x at step
10, 1.26x at step 1,000, 1.0 from ~5,000 on; the reference's 10k warmup steps keep these steps small.
lr(step) = base · min(1, step / warmup) · max(0, 1 - step / total) (linear warmup times linear decay).
"""
import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list:
    decay, no_decay = [], []
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad:
                continue
            excluded = isinstance(module, nn.LayerNorm) or name == "bias"
            (no_decay if excluded else decay).append(parameter)
    # A shared parameter (tied embeddings) is visited once per owner: keep its first group only.
    seen, groups = set(), []
    for parameters, decay_rate in ((decay, weight_decay), (no_decay, 0.0)):
        unique = [p for p in parameters if id(p) not in seen and not seen.add(id(p))]
        groups.append({"params": unique, "weight_decay": decay_rate})
    return groups


class AdamWithoutBiasCorrection(torch.optim.Optimizer):
    """The reference code's AdamWeightDecay: p -= lr · (m / (sqrt(v) + eps) + weight_decay · p)."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                state = self.state[parameter]
                if not state:
                    state["exp_avg"] = torch.zeros_like(parameter)
                    state["exp_avg_sq"] = torch.zeros_like(parameter)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(parameter.grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(parameter.grad, parameter.grad, value=1 - beta2)
                update = exp_avg / (exp_avg_sq.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(parameter, alpha=group["weight_decay"])
                parameter.add_(update, alpha=-group["lr"])
        return loss


def build_optimizer(model: nn.Module, config) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config.weight_decay)
    if config.adam_bias_correction:
        return torch.optim.AdamW(groups, lr=config.learning_rate, betas=tuple(config.adam_betas),
                                 eps=config.adam_epsilon)
    return AdamWithoutBiasCorrection(groups, lr=config.learning_rate, betas=tuple(config.adam_betas),
                                     eps=config.adam_epsilon)


def linear_warmup_linear_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """The factor on the base learning rate for the update that completes step `step` + 1."""
    current = step + 1
    warmup = min(1.0, current / warmup_steps) if warmup_steps else 1.0
    return warmup * max(0.0, 1.0 - current / total_steps)
