"""Optimizers, learning-rate schedules and gradient clipping."""
from .adam import Adam, AdamW
from .clip import clip_grad_norm_, clip_grad_value_
from .lr_scheduler import LambdaLR, NoamLR, WarmupCosineLR, noam_factor, warmup_cosine_factor
from .optimizer import Optimizer
from .sgd import SGD

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "LambdaLR", "NoamLR", "WarmupCosineLR",
           "noam_factor", "warmup_cosine_factor", "clip_grad_norm_", "clip_grad_value_"]
