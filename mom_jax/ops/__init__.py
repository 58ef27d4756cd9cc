"""Sequence-mixing ops: gated delta rule, delta rule, GLA and linear attention."""
from mom_jax.ops.api import (UPDATE_RULES, delta_rule, gated_delta_rule, gated_linear_attention,
                             linear_attention, packed_recurrence, register_pallas_kernel,
                             resolve_impl)
from mom_jax.ops.common import PackedLayout, l2norm

__all__ = ["UPDATE_RULES", "PackedLayout", "delta_rule", "gated_delta_rule",
           "gated_linear_attention", "l2norm", "linear_attention", "packed_recurrence",
           "register_pallas_kernel", "resolve_impl"]
