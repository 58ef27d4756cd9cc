"""Optimiser: AdamW with warm-up + cosine schedule, global-norm clipping and a weight-decay mask."""
from __future__ import annotations

import jax
import optax

NO_DECAY_NAMES = ("A_log", "dt_bias")


def lr_schedule(*, peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1):
    """Linear warm-up from 0 to peak, then cosine decay to ``min_lr_ratio * peak`` at total_steps."""
    if total_steps <= warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps, decay_steps=total_steps,
        end_value=peak_lr * min_lr_ratio)


def decay_mask(params):
    """True where weight decay applies: matrices, except norms, A_log, dt_bias and biases."""
    def keep(path, leaf):
        names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
        if any(n in NO_DECAY_NAMES or "norm" in n or "bias" in n for n in names):
            return False
        return getattr(leaf, "ndim", 0) >= 2
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(*, peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float,
                   b1: float, b2: float, weight_decay: float, clip_norm: float, eps: float = 1e-8):
    """optax chain: clip_by_global_norm -> AdamW(schedule, mask).  Returns (optimizer, schedule)."""
    schedule = lr_schedule(peak_lr=peak_lr, warmup_steps=warmup_steps, total_steps=total_steps,
                           min_lr_ratio=min_lr_ratio)
    tx = optax.chain(
        optax.clip_by_global_norm(clip_norm) if clip_norm > 0 else optax.identity(),
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    return tx, schedule
