"""Pallas kernels for mom_jax.  Importing this package registers them with ``mom_jax.ops``:
rules "gated_delta" and "delta" (``impl="pallas"``, and ``impl="auto"`` on GPU/TPU), and the fused
decode step (``mom_jax.ops.decode_step``) with the layers' fused feature pass, the short-conv
kernel of the layers' packed streams (``mom_jax.ops.resolve_conv_impl``) and the row-grouped
matmul of the MoM layer's routed projections (``mom_jax.ops.resolve_grouped_matmul_impl``)."""
from mom_jax.ops import (register_pallas_conv_kernel, register_pallas_grouped_matmul,
                         register_pallas_kernel, register_pallas_step_kernel)
from pallas_kernels import decode_features as _decode_features
from pallas_kernels import decode_step as _decode_step
from pallas_kernels import grouped_matmul as _grouped_matmul
from pallas_kernels import short_conv as _short_conv
from pallas_kernels.gated_delta import api as _gd_api

register_pallas_kernel("gated_delta", _gd_api.gated_delta_kernel, qk_l2norm=True)
register_pallas_kernel("delta", _gd_api.delta_kernel, qk_l2norm=True)
register_pallas_step_kernel(_decode_step.step_in_place, _decode_step.supported,
                            features=_decode_features.step_features_in_place)
register_pallas_conv_kernel(_short_conv.short_conv)
register_pallas_grouped_matmul(_grouped_matmul.grouped_matmul)

__all__ = ["register_pallas_kernel"]
