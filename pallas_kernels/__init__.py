"""Pallas kernels for mom_jax.  Importing this package registers them with ``mom_jax.ops``:
rules "gated_delta" and "delta" (``impl="pallas"``, and ``impl="auto"`` on GPU/TPU)."""
from mom_jax.ops import register_pallas_kernel
from pallas_kernels.gated_delta import api as _gd_api

register_pallas_kernel("gated_delta", _gd_api.gated_delta_kernel)
register_pallas_kernel("delta", _gd_api.delta_kernel)

__all__ = ["register_pallas_kernel"]
