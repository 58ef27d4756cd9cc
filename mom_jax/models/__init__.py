"""Language models."""
from mom_jax.models.lm import MIXERS, LanguageModel, ModelConfig, params_for_inference

__all__ = ["MIXERS", "LanguageModel", "ModelConfig", "params_for_inference"]
