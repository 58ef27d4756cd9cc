"""Language models."""
from mom_jax.models.lm import MIXERS, LanguageModel, ModelConfig

__all__ = ["MIXERS", "LanguageModel", "ModelConfig"]
