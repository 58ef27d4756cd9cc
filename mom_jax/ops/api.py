"""Public API of the sequence-mixing ops.  Tensors are [B, T, H, dim], as in flash-linear-attention.

Each op picks an implementation with ``impl``:
  "scan"   token-by-token ``lax.scan`` recurrence (ground truth, slow);
  "xla"    chunked pure-XLA form (chunk 64 by default; UT/WY form for the delta rules);
  "pallas" Pallas kernels (GPU through Triton lowering, TPU through Mosaic; interpret mode on CPU),
           available once a kernel is registered for the update rule;
  "auto"   "pallas" on GPU (measured on an H100: the MoM layer's fwd+bwd 16.0 ms with the Pallas
           kernels vs 31.1 ms with XLA, benchmarks/NOTES.md), "xla" on CPU and on TPU (the Mosaic
           kernels are unmeasured on TPU hardware).  ``AUTO_PREFERS_PALLAS`` switches it off.

Varlen input: pass ``cu_seqlens`` (int [N+1]) with batch 1; every sequence starts from its own initial
state (``initial_state`` [N, H, dk, dv]) and gets its own final state.  Lengths may change from call to
call without recompiling: only N and the total length are static.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from mom_jax.ops import chunked, common, scan
from mom_jax.ops.common import PackedLayout

UPDATE_RULES = ("gated_delta", "delta", "gla", "linear")
_DELTA_RULES = ("gated_delta", "delta")


class _PallasKernel(NamedTuple):
    """A registered kernel: fn(q, k, v, g, beta, layout, initial_state, output_final_state) ->
    (o, final); with ``qk_l2norm`` it also takes keywords ``use_qk_l2norm`` and ``scale`` and
    applies the q/k features itself (else ``packed_recurrence`` applies them in XLA first)."""
    fn: Callable
    qk_l2norm: bool


# rule -> _PallasKernel.
_PALLAS_KERNELS: dict[str, _PallasKernel] = {}

# Whether impl="auto" picks a registered Pallas kernel on GPU.  On: measured on an H100 (2026-11-26,
# benchmarks/results/layer_h100.json) the MoM layer (E4, B8 T2048) takes fwd 6.0 / fwd+bwd 16.0 ms
# with the Pallas kernels vs 9.2 / 31.1 ms with XLA.  TPU stays on XLA until measured there.
AUTO_PREFERS_PALLAS = True


# The fused decode-step kernel: fn(state, slots, q, k, v, beta, decay, shared_state, *, interpret)
# -> (state, shared_state, o), with supported(dk, dv) -> bool.  Registered by ``pallas_kernels``
# (Triton: GPU, interpret mode on CPU).
_PALLAS_STEP: dict[str, Callable] = {}

# Whether impl="auto" uses the fused step kernel on GPU.  On: measured faster than the XLA step
# (gather / update / scatter) in the 340M MoM decode loop on an H100: 2.43 vs 2.64 ms/token at
# batch 1, 7.7 vs 20.3 ms at batch 64 (benchmarks/NOTES.md, "Decode step").
AUTO_STEP_PREFERS_PALLAS = True


# The short-conv kernel (causal depthwise conv + SiLU over a packed stream, restarting at segment
# starts): fn(x [B, L, C], weight [W, C], rank [B, L], *, activation) -> [B, L, C], differentiable.
# Registered by ``pallas_kernels`` (Triton: GPU, interpret mode on CPU).
_PALLAS_CONV: dict[str, Callable] = {}

# Whether impl="auto" uses the short-conv kernel on GPU (see ``resolve_conv_impl``).  On: measured
# on an H100 (benchmarks/NOTES.md, session 5; results/layer_run7_h100.json), fwd+bwd of the MoM
# layer (E4, B8 T2048) 11.0 ms with the kernel vs 14.9 ms with XLA's conv, GDN 3.7 vs 5.9 ms (the
# forward alone of MoM is 0.3 ms slower with the kernel: 4.6 vs 4.3 ms).
AUTO_CONV_PREFERS_PALLAS = True


# The row-grouped matmul of the MoM layer's routed projections (``MoMLayer`` with
# routed_projection "grouped", and "auto" where this resolves to "pallas"):
# fn(x [M, K], w [G, K, N], groups [M // group_rows], group_rows, *, config) -> [M, N],
# differentiable.  Registered by ``pallas_kernels`` (Triton: GPU, interpret mode on CPU).
_PALLAS_GROUPED_MATMUL: dict[str, Callable] = {}

# Whether routed_projection="auto" uses the grouped matmul on GPU (with impl "auto" or "pallas").
# On: measured on an H100 (benchmarks/NOTES.md, session 12; results/layer_session12_grouped_ab_h100
# .json), MoM fwd+bwd with dense / grouped routed projections: E4 8.08 / 8.07 ms (B8 T2048),
# 8.14 / 7.94 (B2 T8192); E8 9.59 / 8.70, 10.10 / 8.71.
AUTO_GROUPED_PREFERS_PALLAS = True


def _triton_kernel_impl(impl: str, available: Callable[[], bool], auto_prefers: bool) -> str:
    """The choice rule of the Triton-only kernels (decode step, short conv): "pallas" or "xla".

    "xla" and "scan" -> "xla"; otherwise "xla" unless ``available()`` (asked after the kernels are
    loaded); then "auto" -> "pallas" on GPU when ``auto_prefers``, and "pallas" -> "pallas" on GPU
    and CPU (interpret mode), "xla" on TPU (no Mosaic version).
    """
    common.check_impl(impl)
    if impl not in ("pallas", "auto"):
        return "xla"
    _load_pallas_kernels()
    if not available():
        return "xla"
    backend = jax.default_backend()
    if impl == "auto":
        return "pallas" if auto_prefers and backend in ("gpu", "cuda") else "xla"
    return "pallas" if backend in ("gpu", "cuda", "cpu") else "xla"


def register_pallas_conv_kernel(fn: Callable) -> None:
    """Lets ``pallas_kernels`` plug in the short-conv kernel (see ``resolve_conv_impl``)."""
    _PALLAS_CONV["fn"] = fn


def resolve_conv_impl(impl: str) -> str:
    """Implementation of the layers' short conv over a packed stream: "pallas" (the Triton
    kernel; interpret mode on CPU) or "xla" (``layers.common.short_conv_packed``'s shifted adds).

    "auto" picks the kernel on GPU; "pallas" picks it on GPU and CPU and falls back to XLA on TPU
    (no Mosaic conv kernel); "xla" and "scan" use XLA.
    """
    return _triton_kernel_impl(impl, lambda: "fn" in _PALLAS_CONV, AUTO_CONV_PREFERS_PALLAS)


def register_pallas_grouped_matmul(fn: Callable) -> None:
    """Lets ``pallas_kernels`` plug in the row-grouped matmul (see
    ``resolve_grouped_matmul_impl``)."""
    _PALLAS_GROUPED_MATMUL["fn"] = fn


def resolve_grouped_matmul_impl(impl: str) -> str:
    """Whether a MoM layer with routed_projection="auto" and update-rule ``impl`` projects its
    stream with the grouped matmul kernel ("pallas") or the dense table ("xla"): "auto" picks the
    kernel on GPU, "pallas" on GPU and CPU (interpret mode), "xla" and "scan" never, nor TPU."""
    return _triton_kernel_impl(impl, lambda: "fn" in _PALLAS_GROUPED_MATMUL,
                               AUTO_GROUPED_PREFERS_PALLAS)


def grouped_matmul_kernel() -> Callable:
    """The registered row-grouped matmul (``pallas_kernels.grouped_matmul.grouped_matmul``)."""
    _load_pallas_kernels()
    return _PALLAS_GROUPED_MATMUL["fn"]


def short_conv_kernel() -> Callable:
    """The registered short-conv kernel (use where ``resolve_conv_impl`` gives "pallas")."""
    _load_pallas_kernels()
    return _PALLAS_CONV["fn"]


def register_pallas_step_kernel(fn: Callable, supported: Callable,
                                features: Callable | None = None) -> None:
    """Lets ``pallas_kernels`` plug in the fused one-token step (see ``decode_step``) and the fused
    feature pass of the layers' decode step (``step_features_kernel``)."""
    _PALLAS_STEP.update(fn=fn, supported=supported, features=features)


def step_features_kernel() -> Callable | None:
    """The registered fused feature pass of a layer's decode step (short conv, SiLU, q/k L2-norm,
    beta and decay of the selected memories, conv histories shifted in place): the layers use it
    where ``resolve_step_impl`` gives "pallas".  See ``pallas_kernels.decode_features``."""
    _load_pallas_kernels()
    return _PALLAS_STEP.get("features")


def register_pallas_kernel(rule: str, fn: Callable, *, qk_l2norm: bool = False) -> None:
    """Lets ``pallas_kernels`` plug a kernel in for ``rule``.

    fn(q, k, v, g, beta, layout, initial_state, output_final_state, *, out_dtype) follows the
    ``packed_recurrence`` contract with q, k already normalised / scaled.  ``qk_l2norm=True``
    declares that fn also takes the keywords ``use_qk_l2norm`` and ``scale`` (the
    ``packed_recurrence`` semantics) and applies them inside its own forward/backward; for a kernel
    registered without it, ``packed_recurrence`` normalises and scales q, k in XLA before the call.
    """
    if rule not in UPDATE_RULES:
        raise ValueError(f"unknown update rule {rule!r}")
    _PALLAS_KERNELS[rule] = _PallasKernel(fn, bool(qk_l2norm))


def _load_pallas_kernels() -> None:
    try:  # the kernels register themselves on import
        import pallas_kernels  # noqa: F401
    except ImportError:
        pass


def resolve_impl(impl: str, rule: str) -> str:
    """Maps "auto" to a concrete implementation and checks that the requested one exists."""
    common.check_impl(impl)
    if impl in ("pallas", "auto"):
        _load_pallas_kernels()
    if impl == "auto":
        on_gpu = jax.default_backend() in ("gpu", "cuda")
        use = AUTO_PREFERS_PALLAS and on_gpu and rule in _PALLAS_KERNELS
        return "pallas" if use else "xla"
    if impl == "pallas" and rule not in _PALLAS_KERNELS:
        raise NotImplementedError(
            f"impl='pallas' has no kernel for update rule {rule!r} yet; use impl='xla' or 'auto'")
    return impl


def resolve_step_impl(impl: str, dk: int, dv: int) -> str:
    """Implementation of a decode step: "pallas" (the fused Triton kernel; interpret mode on CPU)
    or "xla" (gather / ``scan.recurrent_step`` / scatter).

    "auto" picks the kernel on GPU when it supports the head dims; "pallas" picks it wherever it
    runs (GPU, or interpret mode on CPU) and falls back to XLA on TPU (no Mosaic step kernel yet)
    or for unsupported head dims; "xla" and "scan" use XLA.
    """
    return _triton_kernel_impl(
        impl, lambda: bool(_PALLAS_STEP) and _PALLAS_STEP["supported"](dk, dv),
        AUTO_STEP_PREFERS_PALLAS)


def decode_step(state, q, k, v, *, slots=None, g=None, gk=None, beta=None, shared_state=None,
                impl: str = "auto"):
    """One token through some memories of a decode cache (the step of ``scan.recurrent_step``).

    Args:
      state: [B, M, H, dk, dv] float32, M memories per row.
      q, k: [B, J, H, dk] (L2-normalised / scaled as wanted); v: [B, J, H, dv].
      slots: int [B, Jr] memory updated by each routed input of a row (distinct within a row), or
        None for Jr == M (memory j gets input j).
      g: [B, J, H] scalar log-decay, gk: [B, J, H, dk] per-key-channel log-decay (at most one);
      beta: [B, J, H] for the delta rules (None: additive write).
      shared_state: [B, H, dk, dv] float32 or None; when given, J = Jr + 1 and the last input of
        each row updates it (a MoM layer's shared memory, in the same kernel launch).
      impl: see ``resolve_step_impl``.
    Returns:
      (new state [B, M, H, dk, dv] float32, identical to ``state`` in the memories not in
       ``slots``; new shared state [B, H, dk, dv] or None; o [B, J, H, dv] float32).  With impl
      "pallas" inside a jit whose buffers can be reused (a donated decode-loop carry), the
      selected memories are updated in place.
    """
    b, m, h, dk, dv = state.shape
    jr = m if slots is None else slots.shape[1]
    j = jr + int(shared_state is not None)
    if q.shape[:3] != (b, j, h) or k.shape != q.shape or v.shape != (b, j, h, dv):
        raise ValueError(f"decode_step: state {state.shape} needs q, k [{b}, {j}, {h}, {dk}] and "
                         f"v [{b}, {j}, {h}, {dv}], got q {q.shape}, k {k.shape}, v {v.shape}")
    if shared_state is not None and tuple(shared_state.shape) != (b, h, dk, dv):
        raise ValueError(f"decode_step: shared_state must be {[b, h, dk, dv]}, got "
                         f"{list(shared_state.shape)}")
    if g is not None and gk is not None:
        raise ValueError("decode_step: pass at most one of g (per head) and gk (per key channel)")
    if resolve_step_impl(impl, dk, dv) == "pallas":
        if slots is None:
            slots = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), (b, m))
        return _PALLAS_STEP["fn"](state, slots, q, k, v, beta, g if gk is None else gk,
                                  shared_state, interpret=jax.default_backend() == "cpu")

    def part(x, sl):
        return None if x is None else x[:, sl]

    routed = slice(0, jr)
    args = [part(x, routed) for x in (q, k, v)]
    kw = dict(g=part(g, routed), gk=part(gk, routed), beta=part(beta, routed))
    if slots is None:
        new, o = scan.recurrent_step(state, *args, **kw)
    else:
        rows = jnp.arange(b)[:, None]
        sel, o = scan.recurrent_step(state[rows, slots], *args, **kw)
        new = state.at[rows, slots].set(sel)
    if shared_state is None:
        return new, None, o
    last = slice(jr, jr + 1)
    shared, o_s = scan.recurrent_step(
        shared_state[:, None], *[part(x, last) for x in (q, k, v)],
        g=part(g, last), gk=part(gk, last), beta=part(beta, last))
    return new, shared[:, 0], jnp.concatenate([o, o_s], axis=1)


def packed_recurrence(rule: str, q, k, v, *, g=None, beta=None, layout: PackedLayout,
                      initial_state=None, output_final_state: bool = False,
                      use_qk_l2norm: bool = False, scale=1.0, impl: str = "auto",
                      out_dtype=jnp.float32):
    """Runs an update rule over a chunk-aligned packed stream (see ``common.PackedLayout``).

    Args:
      rule: one of UPDATE_RULES.
      q, k: [B, L, H, dk] float32 or bfloat16; v: [B, L, H, dv].  Used as given (already
        L2-normalised and scaled as wanted) unless ``use_qk_l2norm`` / ``scale`` say otherwise.
      g: log-decay, [B, L, H] for "gated_delta", [B, L, H, dk] for "gla", None otherwise (float32).
      beta: [B, L, H] for the delta rules, None otherwise.
      layout: segments of the stream; L == layout.num_chunks * layout.chunk_size.
      initial_state: [B, S, H, dk, dv] float32 or None (zeros).
      use_qk_l2norm: q <- l2norm(q) * scale, k <- l2norm(k) inside the op (eps
        ``common.L2NORM_EPS`` = 1e-6, float32; gradients are w.r.t. the raw q, k).  Zero rows
        (padding slots) stay zero.  impl "scan"/"xla" normalise with jnp at the entry; the Pallas
        gated delta kernels normalise inside (GPU: as row scales of their dot results; TPU: in
        XLA beside the kernel) and apply the L2-norm Jacobian in their custom VJP
        (``pallas_kernels.gated_delta.api``).
      scale: q scale, applied after the normalisation (default 1.0: q as given).  A number;
        the Pallas kernel applies it (and the normalisation) itself only when it is static (a
        Python number), else XLA does before the kernel.
      out_dtype: dtype of o (float32 by default).  The computation is float32 either way; o is
        rounded once, by the Pallas kernels as they write it (no float32 copy in memory).
    Returns:
      o: [B, L, H, dv] in out_dtype; final: [B, S, H, dk, dv] float32 (None unless
      output_final_state).
    """
    static_scale = common.check_qk_options(use_qk_l2norm, scale, "packed_recurrence")
    impl = resolve_impl(impl, rule)
    out_dtype = jnp.dtype(out_dtype)
    if impl == "pallas":
        kernel = _PALLAS_KERNELS[rule]
        if kernel.qk_l2norm and static_scale is not None:
            return kernel.fn(q, k, v, g, beta, layout, initial_state, output_final_state,
                             use_qk_l2norm=use_qk_l2norm, scale=static_scale, out_dtype=out_dtype)
        # A kernel that does not normalise itself, or a traced scale (the kernel needs it at
        # trace time): the features in XLA before the kernel (the same function, not fused).
        q, k = common.qk_features(q, k, use_qk_l2norm, scale)
        return kernel.fn(q, k, v, g, beta, layout, initial_state, output_final_state,
                         out_dtype=out_dtype)
    q, k = common.qk_features(q, k, use_qk_l2norm, scale)
    if impl == "scan":
        start, segment = layout.token_view()
        o, final = scan.recurrent_scan(
            q, k, v, g=g if rule == "gated_delta" else None, gk=g if rule == "gla" else None,
            beta=beta, delta=rule in _DELTA_RULES, token_start=start, token_segment=segment,
            num_segments=layout.num_segments, initial_state=initial_state)
    elif rule in _DELTA_RULES:
        o, final = chunked.delta_chunked(q, k, v, g if rule == "gated_delta" else None, beta,
                                         layout, initial_state=initial_state,
                                         output_final_state=output_final_state)
    else:
        o, final = chunked.additive_chunked(q, k, v, g if rule == "gla" else None, layout,
                                            initial_state=initial_state,
                                            output_final_state=output_final_state)
    return o.astype(out_dtype), (final if output_final_state else None)


def _run_op(rule, op, q, k, v, g, beta, *, scale, initial_state, output_final_state, use_qk_l2norm,
            cu_seqlens, chunk_size, impl):
    shapes = common.validate_qkv(q, k, v, op=op)
    b, t, h, dk, dv = shapes.batch, shapes.length, shapes.heads, shapes.key_dim, shapes.value_dim
    if rule == "gated_delta":
        common.validate_gate("g", g, (b, t, h), op)
    if rule == "gla":
        common.validate_gate("g", g, (b, t, h, dk), op)
    if rule in _DELTA_RULES:
        if beta is None:  # the scan would silently skip every write, the chunked form would crash
            raise ValueError(f"{op}: beta is required (shape {[b, t, h]}), got None")
        common.validate_gate("beta", beta, (b, t, h), op)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")
    common.check_impl(impl)
    n_states = b
    if cu_seqlens is not None:
        common.validate_cu_seqlens(cu_seqlens, b, t, op)
        n_states = cu_seqlens.shape[0] - 1
    if initial_state is not None and tuple(initial_state.shape) != (n_states, h, dk, dv):
        what = "number of sequences" if cu_seqlens is not None else "batch"
        raise ValueError(f"{op}: initial_state must have shape [{what}, heads, dk, dv] = "
                         f"{[n_states, h, dk, dv]}, got {list(initial_state.shape)}")

    scale = dk ** -0.5 if scale is None else scale
    common.check_qk_options(use_qk_l2norm, scale, op)
    g = None if g is None else g.astype(jnp.float32)
    beta = None if beta is None else beta.astype(jnp.float32)
    init = None if initial_state is None else initial_state.astype(jnp.float32)
    impl = resolve_impl(impl, rule)
    # The chunked forms get the raw q, k (in their dtype) and apply the features themselves
    # (``packed_recurrence``: inside the Pallas kernel's custom VJP with impl="pallas").
    qk = dict(use_qk_l2norm=use_qk_l2norm, scale=scale)

    if impl == "scan":  # the reference runs on the original token order
        q, k = common.qk_features(q, k, use_qk_l2norm, scale)
        k = k.astype(jnp.float32)
        if cu_seqlens is None:
            start = jnp.zeros((b, t), bool).at[:, 0].set(True)
            segment = jnp.zeros((b, t), jnp.int32)
            init_s = None if init is None else init[:, None]
            nseg = 1
        else:
            cu = cu_seqlens.astype(jnp.int32)
            tok = jnp.arange(t, dtype=jnp.int32)
            segment = (jnp.searchsorted(cu, tok, side="right") - 1)[None]
            start = (tok == cu[jnp.clip(segment[0], 0, n_states - 1)])[None]
            init_s = None if init is None else init[None]
            nseg = n_states
        o, final = scan.recurrent_scan(
            q, k, v, g=g if rule == "gated_delta" else None, gk=g if rule == "gla" else None,
            beta=beta, delta=rule in _DELTA_RULES, token_start=start, token_segment=segment,
            num_segments=nseg, initial_state=init_s)
        final = final[:, 0] if cu_seqlens is None else final[0]
        return o.astype(v.dtype), (final if output_final_state else None)

    if cu_seqlens is None:
        layout = common.rows_layout(b, t, chunk_size)
        length = layout.num_chunks * chunk_size
        padded = [common.pad_time(x, length) for x in (q, k, v, g, beta)]
        o, final = packed_recurrence(rule, *padded[:3], g=padded[3], beta=padded[4], layout=layout,
                                     initial_state=None if init is None else init[:, None],
                                     output_final_state=output_final_state, impl=impl,
                                     out_dtype=v.dtype, **qk)
        o = o[:, :t]
        final = None if final is None else final[:, 0]
    else:
        packing = common.varlen_packing(cu_seqlens, t, chunk_size)
        length = packing.layout.num_chunks * chunk_size

        def pack(x):
            if x is None:
                return None
            return jnp.zeros((1, length) + x.shape[2:], x.dtype).at[0, packing.positions].set(x[0])

        o, final = packed_recurrence(rule, pack(q), pack(k), pack(v), g=pack(g), beta=pack(beta),
                                     layout=packing.layout,
                                     initial_state=None if init is None else init[None],
                                     output_final_state=output_final_state, impl=impl,
                                     out_dtype=v.dtype, **qk)
        o = o[:, packing.positions]
        final = None if final is None else final[0]
    return o, final   # already in v's dtype (out_dtype above)


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm=True, cu_seqlens=None, chunk_size=64, impl="auto"):
    """Gated delta rule: S_t = exp(g_t)(I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T, o_t = S_t^T q_t.

    Args:
      q, k: [B, T, H, dk] (float32 or bfloat16); v: [B, T, H, dv].
      g: [B, T, H] log-decay (<= 0), float32.  beta: [B, T, H] in [0, 1].
      scale: query scale, default dk ** -0.5 (applied after the normalisation).
      initial_state: [B, H, dk, dv] ([N, H, dk, dv] with cu_seqlens), float32.
      use_qk_l2norm: q <- l2norm(q) * scale, k <- l2norm(k) per head inside the op (eps 1e-6,
        float32; default on for the delta rules, as this API always had).  With impl="pallas"
        the normalisation runs inside the kernels' op and its custom VJP (see
        ``packed_recurrence``); scan/xla normalise with jnp.
      cu_seqlens: optional int [N+1] offsets of N sequences packed along T (batch must be 1).
    Returns:
      (o [B, T, H, dv] in v's dtype, final state [B or N, H, dk, dv] float32 or None).
    """
    return _run_op("gated_delta", "gated_delta_rule", q, k, v, g, beta, scale=scale,
                   initial_state=initial_state, output_final_state=output_final_state,
                   use_qk_l2norm=use_qk_l2norm, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                   impl=impl)


def delta_rule(q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False,
               use_qk_l2norm=True, cu_seqlens=None, chunk_size=64, impl="auto"):
    """Delta rule (no decay): S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T.  See gated_delta_rule."""
    return _run_op("delta", "delta_rule", q, k, v, None, beta, scale=scale,
                   initial_state=initial_state, output_final_state=output_final_state,
                   use_qk_l2norm=use_qk_l2norm, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                   impl=impl)


def gated_linear_attention(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
                           use_qk_l2norm=False, cu_seqlens=None, chunk_size=64, impl="auto"):
    """GLA: S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T with per-key-channel log-decay g: [B, T, H, dk].

    Other arguments as in gated_delta_rule (q/k normalisation is off by default, as in fla).
    """
    return _run_op("gla", "gated_linear_attention", q, k, v, g, None, scale=scale,
                   initial_state=initial_state, output_final_state=output_final_state,
                   use_qk_l2norm=use_qk_l2norm, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                   impl=impl)


def linear_attention(q, k, v, *, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm=False, cu_seqlens=None, chunk_size=64, impl="auto"):
    """Causal linear attention: S_t = S_{t-1} + k_t v_t^T, o_t = S_t^T q_t.  See gated_delta_rule."""
    return _run_op("linear", "linear_attention", q, k, v, None, None, scale=scale,
                   initial_state=initial_state, output_final_state=output_final_state,
                   use_qk_l2norm=use_qk_l2norm, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                   impl=impl)
