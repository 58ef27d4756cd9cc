"""Decoder-only language model with a choice of sequence mixer per layer.

  embedding (no positions for recurrent mixers) -> N x [x + mixer(RMSNorm x); x + SwiGLU(RMSNorm x)]
  -> RMSNorm -> head (optionally tied to the embedding)

Mixers: "mom" (MoMLayer), "gated_deltanet", "gla", "attention" (Transformer++: RoPE + causal softmax
attention).  Hybrids: ``attention_every = n`` makes every n-th layer (layers n-1, 2n-1, ...) attention.

Decoding (``mom_jax.decoding`` builds the sampling loop on these): ``init_cache(batch, max_len)``,
``prefill(tokens, max_len=...) -> (logits, cache)`` and ``step(tokens [B], cache) -> (logits [B, V],
cache)``.  The model cache is a tuple with one entry per layer: MoMCache / RecurrentCache (constant
size) for recurrent mixers, KVCache (``max_len`` slots) for attention layers.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from mom_jax import ops
from mom_jax.layers import GatedDeltaNetLayer, GLALayer, MoMLayer
from mom_jax.layers import common as lc
from mom_jax.models.attention import CausalSelfAttention, check_max_len

MIXERS = ("mom", "gated_deltanet", "gla", "attention")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Parameters that every layer only uses cast to the compute dtype (matmul weights and the
# embedding); the others (norm weights, the router, conv taps, decay parameters) are used in
# float32.  ``params_for_inference`` casts these once.
COMPUTE_DTYPE_PARAMS = frozenset({
    "embed", "head", "gate_up", "down", "qkv_proj", "o_proj", "g_proj", "q_proj",
    "k_proj", "v_proj", "b_proj", "a_proj", "shared_k", "shared_v", "shared_b", "shared_a"})


def params_for_inference(params, dtype):
    """``params`` (an nnx.State of a LanguageModel) with the COMPUTE_DTYPE_PARAMS cast to ``dtype``.

    The model computes exactly the same function with the result (each of those parameters is cast
    to the compute dtype at its use anyway), but a decode loop then reads bfloat16 weights instead
    of casting float32 ones at every token (XLA keeps the casts inside the loop: half the weight
    bytes of a batch-1 step, and a 0.06 ms conversion of the embedding per token in the 340M
    models; benchmarks/NOTES.md).
    """
    def cast(path, x):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        if names and names[-1] in COMPUTE_DTYPE_PARAMS and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x
    return jax.tree_util.tree_map_with_path(cast, params)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """All sizes of a language model.  Checked on construction (clear ValueErrors)."""
    vocab_size: int = 32000
    hidden_size: int = 1024
    num_layers: int = 24
    mixer: str = "mom"
    attention_every: int = 0           # 0 = no attention layers (unless mixer == "attention")
    # recurrent mixers
    num_heads: int = 4
    head_dim: int = 256
    expand_v: float = 1.0
    num_memories: int = 4
    topk: int = 2
    shared_memory: bool = True
    update_rule: str = "gated_delta"
    single_kv_proj: bool = False
    use_output_gate: bool = True
    use_short_conv: bool = True
    conv_size: int = 4
    chunk_size: int = 64
    impl: str = "auto"
    routed_projection: str = "auto"
    # attention layers
    attn_num_heads: int = 16
    attn_head_dim: int = 64
    rope_theta: float = 10000.0
    # MLP and the rest
    hidden_ratio: float = 3.0
    intermediate_size: int = 0          # 0 = 256 * ceil(int(D * ratio * 2/3) / 256)
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02
    dtype: str = "bfloat16"             # compute dtype; parameters are float32
    remat: bool = True                  # recompute each block in the backward pass (saves memory)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim",
                     "num_memories", "topk", "conv_size", "chunk_size", "attn_num_heads",
                     "attn_head_dim"):
            lc.positive_int(f"model.{name}", getattr(self, name))
        if self.mixer not in MIXERS:
            raise ValueError(f"model.mixer must be one of {MIXERS}, got {self.mixer!r}")
        if self.topk > self.num_memories:
            raise ValueError(f"model.topk ({self.topk}) cannot exceed model.num_memories "
                             f"({self.num_memories})")
        if self.update_rule not in ops.UPDATE_RULES:
            raise ValueError(f"model.update_rule must be one of {ops.UPDATE_RULES}, "
                             f"got {self.update_rule!r}")
        if self.attention_every < 0 or self.attention_every > self.num_layers:
            raise ValueError(f"model.attention_every must be in [0, num_layers={self.num_layers}], "
                             f"got {self.attention_every}")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.hidden_ratio <= 0 or self.intermediate_size < 0:
            raise ValueError("model.hidden_ratio must be > 0 and model.intermediate_size >= 0")

    @property
    def mlp_size(self) -> int:
        if self.intermediate_size:
            return self.intermediate_size
        return 256 * math.ceil(int(self.hidden_size * self.hidden_ratio * 2 / 3) / 256)

    def layer_mixers(self) -> list[str]:
        """The mixer of each layer."""
        kinds = [self.mixer] * self.num_layers
        if self.attention_every:
            for i in range(self.attention_every - 1, self.num_layers, self.attention_every):
                kinds[i] = "attention"
        return kinds


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        return lc.rms_norm(x, self.weight[...], self.eps).astype(x.dtype)


class SwiGLU(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, init_std: float, rngs: nnx.Rngs):
        init = nnx.initializers.normal(init_std)
        self.gate_up = nnx.Param(init(rngs.params(), (dim, 2 * hidden)))
        self.down = nnx.Param(init(rngs.params(), (hidden, dim)))

    def __call__(self, x):
        gate, up = jnp.split(x @ self.gate_up[...].astype(x.dtype), 2, axis=-1)
        return (jax.nn.silu(gate) * up) @ self.down[...].astype(x.dtype)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, kind: str, rngs: nnx.Rngs):
        dtype = DTYPES[cfg.dtype]
        self.kind = kind
        self.mixer_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        common = dict(num_heads=cfg.num_heads, head_dim=cfg.head_dim, expand_v=cfg.expand_v,
                      use_output_gate=cfg.use_output_gate, use_short_conv=cfg.use_short_conv,
                      conv_size=cfg.conv_size, norm_eps=cfg.norm_eps, chunk_size=cfg.chunk_size,
                      impl=cfg.impl, dtype=dtype, rngs=rngs)
        if kind == "mom":
            self.mixer = MoMLayer(cfg.hidden_size, num_memories=cfg.num_memories, topk=cfg.topk,
                                  shared_memory=cfg.shared_memory, update_rule=cfg.update_rule,
                                  single_kv_proj=cfg.single_kv_proj,
                                  routed_projection=cfg.routed_projection, **common)
        elif kind == "gated_deltanet":
            self.mixer = GatedDeltaNetLayer(cfg.hidden_size, **common)
        elif kind == "gla":
            self.mixer = GLALayer(cfg.hidden_size, **common)
        else:
            self.mixer = CausalSelfAttention(cfg.hidden_size, num_heads=cfg.attn_num_heads,
                                             head_dim=cfg.attn_head_dim, rope_theta=cfg.rope_theta,
                                             init_std=cfg.init_std, dtype=dtype, rngs=rngs)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.mlp_size, init_std=cfg.init_std, rngs=rngs)

    def __call__(self, x):
        """x: [B, T, D] -> (x, router_logits [B, T, E] or None)."""
        out = self.mixer(self.mixer_norm(x))
        logits = None
        if isinstance(out, tuple):
            out, logits = out
        x = x + out.astype(x.dtype)
        x = x + self.mlp(self.mlp_norm(x)).astype(x.dtype)
        return x, logits

    def prefill(self, x, max_len: int):
        """x: [B, T, D] -> (x, router_logits or None, layer cache after the T tokens)."""
        h = self.mixer_norm(x)
        if self.kind == "attention":
            out, cache = self.mixer.prefill(h, max_len)
            logits = None
        elif self.kind == "mom":
            out, logits, cache = self.mixer.prefill(h)
        else:
            out, cache = self.mixer.prefill(h)
            logits = None
        x = x + out.astype(x.dtype)
        x = x + self.mlp(self.mlp_norm(x)).astype(x.dtype)
        return x, logits, cache

    def init_cache(self, batch_size: int, max_len: int, dtype):
        if self.kind == "attention":
            return self.mixer.init_cache(batch_size, max_len, dtype)
        return self.mixer.init_cache(batch_size, dtype)

    def decode_weights(self, dtype):
        """The recurrent mixer's ``decode_weights`` (None for attention)."""
        return None if self.kind == "attention" else self.mixer.decode_weights(dtype)

    def step(self, x, cache, weights=None):
        """x: [B, D] one token per row -> (x [B, D], new layer cache).  weights: decode_weights."""
        h = self.mixer_norm(x)
        if self.kind == "mom":
            out, _, cache = self.mixer.step(h, cache, weights)
        elif self.kind == "attention":
            out, cache = self.mixer.step(h, cache)
        else:
            out, cache = self.mixer.step(h, cache, weights)
        x = x + out.astype(x.dtype)
        x = x + self.mlp(self.mlp_norm(x)).astype(x.dtype)
        return x, cache


class LanguageModel(nnx.Module):
    """Decoder LM.  ``__call__(tokens [B, T] int) -> (logits [B, T, V] float32, router_logits list)``;
    router_logits holds one [B, T, E] float32 array per MoM layer (empty without MoM layers)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        init = nnx.initializers.normal(cfg.init_std)
        self.embed = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.hidden_size)))
        self.blocks = nnx.List([Block(cfg, kind, rngs) for kind in cfg.layer_mixers()])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.head = nnx.Param(init(rngs.params(), (cfg.hidden_size, cfg.vocab_size)))

    def __call__(self, tokens):
        if getattr(tokens, "ndim", None) != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"LanguageModel expects int tokens [batch, time], got "
                             f"{getattr(tokens, 'dtype', None)} {getattr(tokens, 'shape', None)}")
        dtype = DTYPES[self.cfg.dtype]
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dtype)
        router_logits = []
        call = nnx.remat(lambda blk, h: blk(h)) if self.cfg.remat else (lambda blk, h: blk(h))
        for block in self.blocks:
            x, logits = call(block, x)
            if logits is not None:
                router_logits.append(logits)
        x = self.final_norm(x)
        w = self.embed[...].T if self.cfg.tie_embeddings else self.head[...]
        logits = (x @ w.astype(dtype)).astype(jnp.float32)
        return logits, router_logits

    # ---------------------------------------------------------------------------------------------
    # decoding
    # ---------------------------------------------------------------------------------------------
    @property
    def has_attention(self) -> bool:
        return "attention" in self.cfg.layer_mixers()

    def _check_tokens(self, tokens, rank: int):
        what = "[batch, time]" if rank == 2 else "[batch]"
        if getattr(tokens, "ndim", None) != rank or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"LanguageModel expects int tokens {what}, got "
                             f"{getattr(tokens, 'dtype', None)} {getattr(tokens, 'shape', None)}")

    def _logits(self, x):
        x = self.final_norm(x)
        w = self.embed[...].T if self.cfg.tie_embeddings else self.head[...]
        return (x @ w.astype(x.dtype)).astype(jnp.float32)

    def init_cache(self, batch_size: int, max_len: int | None = None) -> tuple:
        """Empty decode cache: a tuple with one cache per layer (see the module docstring).

        max_len: KV slots per attention layer (required iff the model has attention layers; the
        recurrent layers' caches do not depend on it).
        """
        dtype = DTYPES[self.cfg.dtype]
        if self.has_attention:
            check_max_len(max_len, 1)
        return tuple(blk.init_cache(batch_size, max_len, dtype) for blk in self.blocks)

    def prefill(self, tokens, *, max_len: int | None = None, last_only: bool = False):
        """Runs the prompt through the chunked forward and returns the cache after its last token.

        Args:
          tokens: int [B, T] (all rows the same length; ``mom_jax.decoding`` handles ragged
            prompts).  max_len: KV-cache slots of attention layers (>= T; default T).
          last_only: return only the last position's logits (saves the [B, T, V] array).
        Returns:
          (logits float32 [B, T, V] ([B, V] with last_only), cache tuple).  The logits equal
          ``__call__``'s; router logits are not returned.
        """
        self._check_tokens(tokens, 2)
        t = tokens.shape[1]
        if self.has_attention:
            max_len = check_max_len(t if max_len is None else max_len, t)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(DTYPES[self.cfg.dtype])
        caches = []
        for block in self.blocks:
            x, _, cache = block.prefill(x, max_len)
            caches.append(cache)
        if last_only:
            x = x[:, -1]
        return self._logits(x), tuple(caches)

    def decode_weights(self) -> tuple:
        """Per-layer weights of ``step`` in the compute dtype, concatenated once.  Compute this
        outside a decode loop and pass it to every ``step`` (``mom_jax.decoding`` does)."""
        dtype = DTYPES[self.cfg.dtype]
        return tuple(blk.decode_weights(dtype) for blk in self.blocks)

    def step(self, tokens, cache: tuple, weights: tuple | None = None):
        """Decodes one token per row: tokens int [B] -> (logits float32 [B, V], new cache).

        weights: ``decode_weights()`` (computed here when None)."""
        self._check_tokens(tokens, 1)
        if not isinstance(cache, tuple) or len(cache) != len(self.blocks):
            raise ValueError(f"cache must be a tuple of {len(self.blocks)} layer caches "
                             f"(from init_cache / prefill), got {type(cache).__name__}")
        if weights is None:
            weights = self.decode_weights()
        x = jnp.take(self.embed[...], tokens, axis=0).astype(DTYPES[self.cfg.dtype])
        new = []
        for block, c, w in zip(self.blocks, cache, weights):
            x, c = block.step(x, c, w)
            new.append(c)
        return self._logits(x), tuple(new)
