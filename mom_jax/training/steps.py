"""Pure, jit-compiled train and eval steps over a functional (graphdef, params) model.

Parameters travel as a plain nested dict of float32 arrays (``nnx.to_pure_dict``): easy to
checkpoint, shard and differentiate.  ``ModelFn`` rebuilds the NNX module inside the traced function.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mom_jax import routing


@dataclasses.dataclass(frozen=True)
class ModelFn:
    """Calls an NNX module given its parameters as a pure dict."""
    graphdef: Any
    template: Any

    @classmethod
    def from_module(cls, module) -> tuple["ModelFn", dict]:
        graphdef, state = nnx.split(module)
        return cls(graphdef, state), nnx.to_pure_dict(state)

    def module(self, params):
        state = jax.tree.map(lambda x: x, self.template)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)

    def __call__(self, params, *args):
        return self.module(params)(*args)


def lm_losses(model_fn: ModelFn, params, batch, *, topk: int, aux_weight: float):
    """Masked next-token cross-entropy (+ aux_weight * router load-balancing loss).

    batch: inputs [B, T] int32, targets [B, T] int32, loss_mask [B, T] float32.
    Returns (total loss, dict of metrics incl. per-token losses for evaluation).
    """
    logits, router_logits = model_fn(params, batch["inputs"])
    mask = batch["loss_mask"].astype(jnp.float32)
    targets = jnp.maximum(batch["targets"], 0)
    token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets) * mask
    denom = jnp.maximum(jnp.sum(mask), 1.0)
    ce = jnp.sum(token_loss) / denom
    metrics = dict(ce=ce, tokens=jnp.sum(mask))
    total = ce
    if router_logits:
        aux = routing.load_balancing_loss(router_logits, topk, mask > 0)
        total = total + aux_weight * aux
        metrics["aux"] = aux
        # fraction of routed slots per memory, per layer: [layers, E]
        e = router_logits[0].shape[-1]
        loads = []
        for lg in router_logits:
            choice = jax.nn.one_hot(jax.lax.top_k(lg, topk)[1], e).sum(-2)        # [B, T, E]
            loads.append(jnp.sum(choice * mask[..., None], (0, 1)) / (denom * topk))
        metrics["router_load"] = jnp.stack(loads)
    metrics["loss"] = total
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32) * mask
    metrics["accuracy"] = jnp.sum(correct) / denom
    return total, metrics, (token_loss, correct)


def make_train_step(model_fn: ModelFn, tx, *, topk: int, aux_weight: float, grad_accum: int = 1):
    """Returns train_step(params, opt_state, batch) -> (params, opt_state, metrics).

    With grad_accum > 1 the batch's leading axis is split into that many micro-batches whose
    gradients are averaged (a lax.scan, so memory holds one micro-batch's activations).
    """
    def grads_of(params, batch):
        (_, metrics), grads = jax.value_and_grad(
            lambda p: lm_losses(model_fn, p, batch, topk=topk, aux_weight=aux_weight)[:2],
            has_aux=True)(params)
        return grads, metrics

    def train_step(params, opt_state, batch):
        if grad_accum == 1:
            grads, metrics = grads_of(params, batch)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:]), batch)
            zeros = jax.tree.map(jnp.zeros_like, params)

            def body(acc, mb):
                g, m = grads_of(params, mb)
                return jax.tree.map(jnp.add, acc, g), m
            grads, ms = jax.lax.scan(body, zeros, micro)
            grads = jax.tree.map(lambda g: g / grad_accum, grads)
            metrics = jax.tree.map(lambda m: jnp.mean(m, 0), ms)
            metrics["tokens"] = metrics["tokens"] * grad_accum
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return params, opt_state, metrics

    return train_step


def make_eval_step(model_fn: ModelFn, *, topk: int):
    """eval_step(params, batch) -> dict(token_loss [B, T], correct [B, T]) float32, zero off-mask.

    Aggregation (perplexity, accuracy by group, recall-hit subsets) happens on the host, exactly.
    """
    def eval_step(params, batch):
        _, _, (token_loss, correct) = lm_losses(model_fn, params, batch, topk=topk, aux_weight=0.0)
        return dict(token_loss=token_loss, correct=correct)
    return eval_step
