"""An independent, token-by-token MoM layer written with plain jnp and Python loops.

It shares no code with mom_jax: for every token it routes, advances the selected memories' own conv
histories and states, reads them, combines, and applies the output head.  Parameters come as the pure
dict of a MoMLayer / SingleMemoryLayer (weights [in, out]).  Routing choices are passed in (they are
not differentiable), so the function can be differentiated w.r.t. parameters and input.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def _silu(x):
    return x / (1.0 + jnp.exp(-x))


def _l2(x):
    return x / jnp.sqrt(jnp.sum(x * x) + 1e-6)


def routing_choices(p, x, topk):
    """Concrete top-k choices (stable: ties go to the lower memory index), numpy [B, T, k]."""
    logits = np.asarray(x, np.float64) @ np.asarray(p["gate"], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.argsort(-probs, axis=-1, kind="stable")[..., :topk]


def _memory_step(p, cfg, mem, xt, q_raw, hist, state, proj_names):
    """Advances one memory by one token; returns (o [H, dv], new hist, new state)."""
    h, dk, dv = cfg["heads"], cfg["dk"], cfg["dv"]
    kd = h * dk
    def w(name):
        arr = p[proj_names[name]]
        return arr if mem is None else arr[mem]
    k_raw, v_raw = xt @ w("k"), xt @ w("v")
    raw = jnp.concatenate([q_raw, k_raw, v_raw])
    hist = hist + [raw]
    if cfg["conv"]:
        conv = jnp.concatenate([p["q_conv"], p["k_conv"], p["v_conv"]], axis=1)   # [W, C]
        width = conv.shape[0]
        window = hist[-width:]
        window = [jnp.zeros_like(raw)] * (width - len(window)) + window
        feat = _silu(sum(conv[i] * window[i] for i in range(width)))
    else:
        feat = _silu(raw)
    rule = cfg["rule"]
    out = []
    new_state = []
    for hh in range(h):
        q = _l2(feat[hh * dk:(hh + 1) * dk]) * dk ** -0.5
        k = _l2(feat[kd + hh * dk:kd + (hh + 1) * dk])
        v = feat[2 * kd + hh * dv:2 * kd + (hh + 1) * dv]
        s = state[hh]
        if rule == "gated_delta":
            a = (xt @ w("a"))[hh]
            g = -jnp.exp(p["A_log"][hh]) * jnp.log1p(jnp.exp(a + p["dt_bias"][hh]))
            s = jnp.exp(g) * s
        elif rule == "gla":
            a = (xt @ w("a"))[hh * dk:(hh + 1) * dk]
            gk = -jnp.log1p(jnp.exp(-a)) / 16.0          # logsigmoid / 16
            s = jnp.exp(gk)[:, None] * s
        if rule in ("gated_delta", "delta"):
            beta = 1.0 / (1.0 + jnp.exp(-(xt @ w("b"))[hh]))
            s = s + beta * jnp.outer(k, v - s.T @ k)
        else:
            s = s + jnp.outer(k, v)
        new_state.append(s)
        out.append(s.T @ q)
    return jnp.stack(out), hist, new_state


def reference_mom(p, x, cfg, choices=None):
    """MoM layer output [B, T, D].

    cfg: dict(heads, dk, dv, rule, conv, output_gate, eps, num_memories, topk, shared, single_kv).
    """
    b_size, t_size, _ = x.shape
    h, dk, dv = cfg["heads"], cfg["dk"], cfg["dv"]
    routed_names = ({n: f"shared_{n}" for n in "kvba"} if cfg["single_kv"]
                    else {n: f"{n}_proj" for n in "kvba"})
    shared_names = {n: f"shared_{n}" for n in "kvba"}
    rows = []
    for b in range(b_size):
        states = [[jnp.zeros((dk, dv))] * h for _ in range(cfg["num_memories"])]
        hists = [[] for _ in range(cfg["num_memories"])]
        s_state, s_hist = [jnp.zeros((dk, dv))] * h, []
        outs = []
        for t in range(t_size):
            xt = x[b, t]
            logits = xt @ p["gate"]
            probs = jnp.exp(logits - jnp.max(logits))
            probs = probs / jnp.sum(probs)
            sel = [int(m) for m in choices[b, t]]
            wsel = jnp.stack([probs[m] for m in sel])
            wsel = wsel / jnp.sum(wsel)
            q_raw = xt @ p["q_proj"]
            y = jnp.zeros((h, dv))
            for j, m in enumerate(sel):
                o, hists[m], states[m] = _memory_step(
                    p, cfg, None if cfg["single_kv"] else m, xt, q_raw, hists[m], states[m],
                    routed_names)
                y = y + wsel[j] * o
            if cfg["shared"]:
                o, s_hist, s_state = _memory_step(p, cfg, None, xt, q_raw, s_hist, s_state,
                                                  shared_names)
                y = y + o
            outs.append(_head(p, cfg, y, xt))
        rows.append(jnp.stack(outs))
    return jnp.stack(rows)


def reference_single(p, x, cfg):
    """Single-memory layer (GatedDeltaNet / GLA) output [B, T, D]."""
    names = {n: f"{n}_proj" for n in "kvba"}
    h, dk, dv = cfg["heads"], cfg["dk"], cfg["dv"]
    rows = []
    for b in range(x.shape[0]):
        state, hist, outs = [jnp.zeros((dk, dv))] * h, [], []
        for t in range(x.shape[1]):
            xt = x[b, t]
            o, hist, state = _memory_step(p, cfg, None, xt, xt @ p["q_proj"], hist, state, names)
            outs.append(_head(p, cfg, o, xt))
        rows.append(jnp.stack(outs))
    return jnp.stack(rows)


def _head(p, cfg, y, xt):
    hp = p["head"]
    ms = jnp.mean(y * y, axis=-1, keepdims=True)
    y = y / jnp.sqrt(ms + cfg["eps"]) * hp["o_norm"]
    if cfg["output_gate"]:
        y = y * _silu((xt @ hp["g_proj"]).reshape(y.shape))
    return y.reshape(-1) @ hp["o_proj"]
