"""Defaults shared by every experiment config (ml_collections).  Each config file's get_config()
starts from these and overrides; any field can be overridden on the command line:
  python -m experiments.train --config=experiments/configs/mqar_tiny.py --config.train.steps=100
"""
import dataclasses

import ml_collections

from mom_jax.models import ModelConfig


def model_config(**overrides) -> ml_collections.ConfigDict:
    """All ModelConfig fields with their defaults (the paper's 340M MoM), then overrides."""
    fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    unknown = set(overrides) - set(fields)
    if unknown:
        raise ValueError(f"unknown model fields: {sorted(unknown)}")
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def train_config(**overrides) -> ml_collections.ConfigDict:
    fields = dict(
        batch_size=8,            # global batch (sequences per optimiser step)
        seq_len=2048,
        steps=1000,
        warmup_steps=100,
        lr=3e-4, min_lr_ratio=0.1, b1=0.9, b2=0.95, weight_decay=0.01, clip_norm=1.0,
        grad_accum=1,            # micro-batches per step (batch_size must divide)
        aux_weight=0.01,         # router load-balancing loss weight (paper's best 380M run: 1e-3)
        seed=0,
        log_every=10,
        eval_every=200,          # 0 = only at the end
        eval_batches=8,
        checkpoint_every=500,
        keep_checkpoints=3,
        stop_at_step=0,          # > 0: save and stop once this step is reached (time-limited jobs)
    )
    unknown = set(overrides) - set(fields)
    if unknown:
        raise ValueError(f"unknown train fields: {sorted(unknown)}")
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def base_config(*, model, data, train, workdir: str) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = model
    config.data = data
    config.train = train
    config.workdir = workdir
    config.resume = False        # continue from the latest checkpoint in workdir
    return config
