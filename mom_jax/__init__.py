"""mom_jax: Mixture-of-Memories linear sequence models in JAX / Flax NNX."""
