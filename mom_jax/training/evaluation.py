"""Exact evaluation over a list of batches: perplexity, accuracy, MQAR accuracy by number of
key-value pairs, and (for text) associative-recall-hit perplexity."""
from __future__ import annotations

import numpy as np
from jax.experimental import multihost_utils


def recall_hit_mask(inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """bool [B, T]: position t's (input, target) bigram already occurred earlier in the row."""
    hit = np.zeros(inputs.shape, bool)
    for b in range(inputs.shape[0]):
        seen = set()
        for t in range(inputs.shape[1]):
            pair = (int(inputs[b, t]), int(targets[b, t]))
            hit[b, t] = pair in seen
            seen.add(pair)
    return hit


def evaluate(eval_step, params, batches, shard, *, recall_hit: bool = False) -> dict:
    """Runs ``eval_step`` (see training.steps.make_eval_step) over ``batches`` (this process's rows).

    ``shard`` turns a host batch into global device arrays.  Sums are exact over every process's
    rows.  Returns dict(loss, ppl, accuracy[, accuracy_by_kv_pairs][, recall_hit_ppl,
    recall_hit_tokens]).
    """
    loss_sum = tok = correct = hit_loss = hit_tok = 0.0
    by_kv: dict[int, list[float]] = {}
    for batch in batches:
        sharded = shard(batch)
        out = eval_step(params, sharded)
        gathered = multihost_utils.process_allgather(
            (out["token_loss"], out["correct"], sharded["loss_mask"], sharded["inputs"],
             sharded["targets"]), tiled=True)
        loss, corr, mask, inputs, targets = (np.asarray(x) for x in gathered)
        mask = mask.astype(np.float64)
        loss_sum += float(np.sum(loss))
        correct += float(np.sum(corr))
        tok += float(mask.sum())
        if recall_hit:
            hit = recall_hit_mask(inputs, targets) & (mask > 0)
            hit_loss += float(loss[hit].sum())
            hit_tok += float(hit.sum())
        if "num_kv_pairs" in batch:
            kv = multihost_utils.process_allgather(np.asarray(batch["num_kv_pairs"]), tiled=True)
            for n, c, m in zip(np.asarray(kv), np.sum(corr, -1), mask.sum(-1)):
                acc = by_kv.setdefault(int(n), [0.0, 0.0])
                acc[0] += float(c)
                acc[1] += float(m)
    loss = loss_sum / max(tok, 1.0)
    res = dict(tokens=int(tok), loss=loss, ppl=float(np.exp(min(loss, 50.0))),
               accuracy=correct / max(tok, 1.0))
    if by_kv:
        res["accuracy_by_kv_pairs"] = {k: v[0] / max(v[1], 1.0) for k, v in sorted(by_kv.items())}
    if recall_hit and hit_tok:
        res.update(recall_hit_tokens=int(hit_tok),
                   recall_hit_ppl=float(np.exp(min(hit_loss / hit_tok, 50.0))))
    return res
