"""Sequence-mixing layers (Flax NNX): the MoM layer and its single-memory baselines."""
from mom_jax.layers.baselines import GatedDeltaNetLayer, GLALayer, RecurrentCache, SingleMemoryLayer
from mom_jax.layers.mom import MoMCache, MoMLayer

__all__ = ["GLALayer", "GatedDeltaNetLayer", "MoMCache", "MoMLayer", "RecurrentCache",
           "SingleMemoryLayer"]
