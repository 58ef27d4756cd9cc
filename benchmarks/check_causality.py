"""Causality probe of the 340M models' training forward and backward on the accelerator.

  python -m benchmarks.check_causality [--layers 24] [--variants gated_deltanet,mom] [--impls xla,pallas]

Per variant and impl: per-token losses (computed inside ``jax.value_and_grad``, as in training; the
gradient's global norm is printed too) for B2 x T2048 random tokens, then again with every token
after position 1024 replaced.  The losses before 1024 must not change (MoM: up
to rounding, its packed stream shifts when later tokens route differently); a leak of future
tokens into the forward would change them (and speed up memorisation of a repeated batch, the
symptom that made us write this).  The small-model version of this check is the CPU test
``tests/test_training.py::test_model_is_causal_in_logits_and_gradient``.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.configs import lm_340m
from mom_jax.models import LanguageModel, ModelConfig
from mom_jax.training import steps


def probe(variant: str, impl: str, layers: int, batch: int = 2, seq: int = 2048, cut: int = 1024):
    kw = dict(lm_340m.model_kwargs(variant), num_layers=layers)
    mc = ModelConfig(**kw, impl=impl)
    model_fn, params = steps.ModelFn.from_module(LanguageModel(mc, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    tok = rng.integers(0, mc.vocab_size, (batch, seq + 1)).astype(np.int32)
    tok2 = tok.copy()
    tok2[:, cut + 1:] = rng.integers(0, mc.vocab_size, (batch, seq - cut))

    def batch_of(t):
        return dict(inputs=jnp.asarray(t[:, :-1]), targets=jnp.asarray(t[:, 1:]),
                    loss_mask=jnp.ones((batch, seq), jnp.float32))

    @jax.jit
    def losses_and_grad(p, b):
        def f(p):
            total, _, (token_loss, _) = steps.lm_losses(model_fn, p, b, topk=mc.topk,
                                                        aux_weight=0.01)
            return total, token_loss
        (total, token_loss), g = jax.value_and_grad(f, has_aux=True)(p)
        return total, token_loss, optax.global_norm(g)

    t0 = time.perf_counter()
    l1, tl1, gn = losses_and_grad(params, batch_of(tok))
    _, tl2, _ = losses_and_grad(params, batch_of(tok2))
    jax.block_until_ready((tl1, tl2))
    return dict(variant=variant, impl=impl, layers=layers, loss=float(l1),
                prefix_diff=float(jnp.max(jnp.abs(tl1[:, :cut] - tl2[:, :cut]))),
                suffix_diff=float(jnp.max(jnp.abs(tl1[:, cut:] - tl2[:, cut:]))),
                grad_norm=float(gn), seconds=time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--variants", default="gated_deltanet,mom")
    ap.add_argument("--impls", default="xla,pallas")
    args = ap.parse_args()
    print(f"device: {jax.devices()[0].device_kind}", flush=True)
    for v in args.variants.split(","):
        for impl in args.impls.split(","):
            r = probe(v, impl, args.layers)
            print(f"{v:15s} {impl:6s} L={r['layers']} loss {r['loss']:.4f} prefix-diff "
                  f"{r['prefix_diff']:.3e} suffix-diff {r['suffix_diff']:.3e} grad-norm "
                  f"{r['grad_norm']:.4f} ({r['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
