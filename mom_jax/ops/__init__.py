"""Sequence-mixing ops: gated delta rule, delta rule, GLA and linear attention."""
from mom_jax.ops.api import (UPDATE_RULES, decode_step, delta_rule, gated_delta_rule,
                             gated_linear_attention, grouped_matmul_kernel, linear_attention,
                             packed_recurrence, register_pallas_conv_kernel,
                             register_pallas_grouped_matmul, register_pallas_kernel,
                             register_pallas_step_kernel, resolve_conv_impl,
                             resolve_grouped_matmul_impl, resolve_impl, resolve_step_impl,
                             short_conv_kernel, step_features_kernel)
from mom_jax.ops.common import PackedLayout, l2norm

__all__ = ["UPDATE_RULES", "PackedLayout", "decode_step", "delta_rule", "gated_delta_rule",
           "gated_linear_attention", "grouped_matmul_kernel", "l2norm", "linear_attention",
           "packed_recurrence", "register_pallas_conv_kernel", "register_pallas_grouped_matmul",
           "register_pallas_kernel", "register_pallas_step_kernel", "resolve_conv_impl",
           "resolve_grouped_matmul_impl", "resolve_impl", "resolve_step_impl",
           "short_conv_kernel", "step_features_kernel"]
