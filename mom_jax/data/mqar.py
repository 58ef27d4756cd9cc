"""Multi-query associative recall (MQAR), generated in-process (Zoology / Based recipe).

One example of length ``T = seq_len`` with ``K = num_kv_pairs`` and vocabulary ``V``::

    position  0    1    2    3   ...  2K-2  2K-1 | 2K ...                                   T-1
    token     k_0  v_0  k_1  v_1 ...  k_K-1 v_K-1 | filler ... k_i v_i filler ... k_j v_j ...

* keys ``k_i`` are distinct, drawn uniformly from the lower half of the vocabulary ``[1, V//2)``
  (token 0 is the filler of ``random_non_queries=False``), values ``v_i`` are distinct, drawn
  uniformly from the upper half ``[V//2, V)``;
* after the ``K`` key-value pairs, every key is queried exactly once. The remaining space holds
  ``S = (T - 2K) // 2`` query slots at positions ``2K + 2g`` (``g = 0..S-1``); the ``K`` slots are
  drawn without replacement with ``p(g) ∝ a * (g + 1) ** (a - 1)`` (power law, ``a = power_a``;
  small ``a`` favours short gaps), and ``k_i`` goes to the ``i``-th draw, as in Zoology;
* every other position holds a filler token: uniform over the whole vocabulary
  (``random_non_queries=True``, Zoology's default) or 0.

Targets are next-token labels everywhere (``targets[:, t] == inputs[:, t + 1]``), which is why
the queried value is also written into the input right after its query key (Zoology leaves a
filler there; the task is the same because every key is queried once). ``loss_mask`` is 1 exactly at
the query positions, where the target is the value paired with the key; accuracy is measured there.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

# Rows x width of the temporary random matrices used for sampling without replacement.
_CHUNK_ELEMENTS = 1 << 22


def _top_k_draws(rng: np.random.Generator, num_rows: int, width: int, k: int,
                 log_p: np.ndarray | None) -> np.ndarray:
    """``k`` distinct indices in ``[0, width)`` per row, in draw order, sampled without replacement.

    Gumbel-top-k: the ``k`` largest of ``log_p + Gumbel noise``, sorted descending, have the law of
    ``k`` successive draws without replacement with probabilities ``∝ exp(log_p)``. ``log_p=None`` is
    uniform (plain random order).

    Returns:
      int64 [num_rows, k].
    """
    out = np.empty((num_rows, k), dtype=np.int64)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(width, 1))
    for start in range(0, num_rows, rows_per_chunk):
        stop = min(num_rows, start + rows_per_chunk)
        u = rng.random((stop - start, width))
        if log_p is None:
            scores = u  # any i.i.d. continuous scores give a uniformly random ordering
        else:
            scores = log_p[None, :] - np.log(-np.log1p(-u))  # log_p + Gumbel(0, 1), u in [0, 1)
        if k < width:
            idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        else:
            idx = np.broadcast_to(np.arange(width), (stop - start, width)).copy()
        order = np.argsort(-np.take_along_axis(scores, idx, axis=1), axis=1, kind="stable")
        out[start:stop] = np.take_along_axis(idx, order, axis=1)
    return out


def _distinct_uniform(rng: np.random.Generator, num_rows: int, width: int, k: int) -> np.ndarray:
    """``k`` distinct indices in ``[0, width)`` per row, a uniformly random ordered k-subset.

    For ``k * k <= 2 * width`` rows are drawn with replacement and rows holding a repeat are redrawn
    (i.i.d. draws conditioned on being distinct are exactly a uniform ordered k-subset; at most ~63% of
    rows are redrawn per round); otherwise (or for rows still left after a few rounds) Gumbel-top-k.

    Returns:
      int64 [num_rows, k].
    """
    out = np.empty((num_rows, k), dtype=np.int64)
    todo = np.arange(num_rows)
    if k * k <= 2 * width:
        for _ in range(32):
            if todo.size == 0:
                break
            draw = rng.integers(0, width, size=(todo.size, k))
            srt = np.sort(draw, axis=1)
            ok = ~np.any(srt[:, 1:] == srt[:, :-1], axis=1)
            out[todo[ok]] = draw[ok]
            todo = todo[~ok]
    if todo.size:
        out[todo] = _top_k_draws(rng, todo.size, width, k, None)
    return out


def check_mqar_args(*, num_examples: int, seq_len: int, num_kv_pairs: int, vocab_size: int,
                    power_a: float) -> None:
    """Raises ValueError (or TypeError) with a clear message for arguments MQAR cannot satisfy."""
    for name, value in (("num_examples", num_examples), ("seq_len", seq_len),
                        ("num_kv_pairs", num_kv_pairs), ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"MQAR {name} must be an int, got {value!r}")
    if num_examples < 1:
        raise ValueError(f"MQAR num_examples must be >= 1, got {num_examples}")
    if num_kv_pairs < 1:
        raise ValueError(f"MQAR num_kv_pairs must be >= 1, got {num_kv_pairs}")
    if seq_len < 4 * num_kv_pairs:
        raise ValueError(
            f"MQAR seq_len={seq_len} is too short for num_kv_pairs={num_kv_pairs}: it needs "
            f"seq_len >= 4 * num_kv_pairs = {4 * num_kv_pairs} (2K tokens of key-value pairs, then "
            f"K query slots of 2 tokens each).")
    num_keys = vocab_size // 2 - 1
    num_values = vocab_size - vocab_size // 2
    if num_keys < num_kv_pairs or num_values < num_kv_pairs:
        raise ValueError(
            f"MQAR vocab_size={vocab_size} is too small for num_kv_pairs={num_kv_pairs} distinct keys "
            f"and values: keys come from [1, {vocab_size // 2}) ({num_keys} ids) and values from "
            f"[{vocab_size // 2}, {vocab_size}) ({num_values} ids); need vocab_size >= "
            f"{2 * num_kv_pairs + 2}.")
    if not (isinstance(power_a, (int, float, np.floating)) and math.isfinite(power_a) and power_a > 0):
        raise ValueError(f"MQAR power_a must be a finite number > 0, got {power_a!r}")


def generate_mqar(rng: np.random.Generator, *, num_examples: int, seq_len: int, num_kv_pairs: int,
                  vocab_size: int = 8192, power_a: float = 0.01,
                  random_non_queries: bool = True) -> dict[str, np.ndarray]:
    """Generates ``num_examples`` MQAR sequences (see the module docstring for the layout).

    Args:
      rng: numpy Generator; the output is a deterministic function of its state.
      num_examples: N.
      seq_len: T, the model's input length (>= 4 * num_kv_pairs).
      num_kv_pairs: K, key-value pairs per example (all are queried).
      vocab_size: V; keys in [1, V//2), values in [V//2, V).
      power_a: exponent ``a`` of the query-gap law ``p(g) ∝ a * (g + 1) ** (a - 1)``.
      random_non_queries: filler tokens uniform over [0, V) if True, else 0.

    Returns:
      dict with
        ``inputs``  int32 [N, T] token ids,
        ``targets`` int32 [N, T] next-token ids (``targets[:, t] == inputs[:, t + 1]``; always valid
                    ids in [0, V), the queried value at query positions),
        ``loss_mask`` float32 [N, T]: 1.0 exactly at the K query positions of each row, else 0.0,
        ``num_kv_pairs`` int32 [N] (= K).
    """
    seq, query_pos = generate_mqar_compact(
        rng, num_examples=num_examples, seq_len=seq_len, num_kv_pairs=num_kv_pairs,
        vocab_size=vocab_size, power_a=power_a, random_non_queries=random_non_queries)
    n, t = seq.shape[0], seq.shape[1] - 1
    loss_mask = np.zeros((n, t), dtype=np.float32)
    np.put_along_axis(loss_mask, query_pos, 1.0, axis=1)
    return {
        "inputs": seq[:, :t].astype(np.int32),
        "targets": seq[:, 1:].astype(np.int32),
        "loss_mask": loss_mask,
        "num_kv_pairs": np.full((n,), num_kv_pairs, dtype=np.int32),
    }


def generate_mqar_compact(rng: np.random.Generator, *, num_examples: int, seq_len: int,
                          num_kv_pairs: int, vocab_size: int = 8192, power_a: float = 0.01,
                          random_non_queries: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Same examples as :func:`generate_mqar` (same ``rng`` draws), stored compactly.

    Returns:
      seq: [N, T + 1] token stream (uint16 if ``vocab_size <= 65536`` else int32);
        ``inputs = seq[:, :T]``, ``targets = seq[:, 1:]``.
      query_pos: int32 [N, K] query positions (``loss_mask`` is 1 there), ``query_pos[:, i]`` is the
        query of the i-th key-value pair.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"generate_mqar needs a numpy.random.Generator, got {type(rng).__name__}")
    check_mqar_args(num_examples=num_examples, seq_len=seq_len, num_kv_pairs=num_kv_pairs,
                    vocab_size=vocab_size, power_a=power_a)
    n, t, k, v = int(num_examples), int(seq_len), int(num_kv_pairs), int(vocab_size)
    half = v // 2
    dtype = np.uint16 if v <= 1 << 16 else np.int32

    keys = 1 + _distinct_uniform(rng, n, half - 1, k)       # [N, K] distinct in [1, V//2)
    values = half + _distinct_uniform(rng, n, v - half, k)  # [N, K] distinct in [V//2, V)

    context = 2 * k
    space = (t - context) // 2
    g = np.arange(1, space + 1, dtype=np.float64)
    log_p = np.log(power_a) + (power_a - 1.0) * np.log(g)
    log_p -= np.logaddexp.reduce(log_p)
    gaps = _top_k_draws(rng, n, space, k, log_p)             # [N, K], gaps[:, i] is key i's slot

    if random_non_queries:
        seq = rng.integers(0, v, size=(n, t + 1), dtype=np.int64).astype(dtype)
    else:
        seq = np.zeros((n, t + 1), dtype=dtype)
    seq[:, 0:context:2] = keys
    seq[:, 1:context:2] = values
    query_pos = context + 2 * gaps                           # [N, K], <= T - 2
    np.put_along_axis(seq, query_pos, keys.astype(dtype), axis=1)
    np.put_along_axis(seq, query_pos + 1, values.astype(dtype), axis=1)
    return seq, query_pos.astype(np.int32)


def query_accuracy(predictions: np.ndarray, targets: np.ndarray, loss_mask: np.ndarray) -> float:
    """Fraction of masked positions predicted correctly.

    Args:
      predictions: int [..., T] predicted ids (argmax of the logits).
      targets: int [..., T]; loss_mask: float [..., T] (1 at the query positions).
    """
    mask = np.asarray(loss_mask, dtype=np.float64)
    total = mask.sum()
    if total == 0:
        raise ValueError("query_accuracy: loss_mask has no positions")
    return float(((np.asarray(predictions) == np.asarray(targets)) * mask).sum() / total)


def accuracy_by_num_kv_pairs(predictions: np.ndarray,
                             batch: Mapping[str, np.ndarray]) -> dict[int, float]:
    """Query accuracy per number of key-value pairs.

    Args:
      predictions: int [B, T]; batch: an MQAR batch (``targets``, ``loss_mask`` [B, T],
        ``num_kv_pairs`` [B]).
    Returns:
      {K: accuracy over the query positions of the rows with K pairs (rows with no mask skipped)}.
    """
    correct = (np.asarray(predictions) == batch["targets"]) * batch["loss_mask"]
    out = {}
    for kv in np.unique(batch["num_kv_pairs"]):
        rows = batch["num_kv_pairs"] == kv
        total = batch["loss_mask"][rows].sum()
        if total > 0:
            out[int(kv)] = float(correct[rows].sum() / total)
    return out


SPLITS = {"train": 0, "test": 1}


def split_rng(seed: int, split: str, num_kv_pairs: int) -> np.random.Generator:
    """The generator of one (seed, split, K) MQAR set: train and test never share a stream."""
    if split not in SPLITS:
        raise ValueError(f"Unknown MQAR split {split!r}; expected one of {tuple(SPLITS)}")
    return np.random.default_rng([int(seed), SPLITS[split], int(num_kv_pairs)])


class MQARExamples:
    """A fixed MQAR set as a random-access grain data source (compact: ~3 bytes per token).

    ``self[i]`` -> dict ``inputs`` int32 [T], ``targets`` int32 [T], ``loss_mask`` float32 [T],
    ``num_kv_pairs`` int32 [] (scalar; batching makes it [B]).

    Args:
      seed: data seed; the set is a deterministic function of all arguments.
      split: "train" or "test" (independent random streams for the same seed).
      num_examples: {K: number of examples with K key-value pairs}; groups are stored in this order.
      seq_len, vocab_size, power_a, random_non_queries: as in :func:`generate_mqar`.
    """

    def __init__(self, *, seed: int, split: str, num_examples: Mapping[int, int], seq_len: int,
                 vocab_size: int, power_a: float = 0.01, random_non_queries: bool = True):
        seqs, masks, kvs = [], [], []
        for k, n in num_examples.items():
            seq, query_pos = generate_mqar_compact(
                split_rng(seed, split, k), num_examples=n, seq_len=seq_len, num_kv_pairs=k,
                vocab_size=vocab_size, power_a=power_a, random_non_queries=random_non_queries)
            mask = np.zeros((n, seq_len), dtype=bool)
            np.put_along_axis(mask, query_pos, True, axis=1)
            seqs.append(seq)
            masks.append(mask)
            kvs.append(np.full((n,), k, dtype=np.int32))
        if not seqs:
            raise ValueError("MQARExamples needs at least one num_kv_pairs group")
        self.seq = np.concatenate(seqs)       # [N, T + 1]
        self.mask = np.concatenate(masks)     # bool [N, T]
        self.num_kv_pairs = np.concatenate(kvs)  # int32 [N]
        self.seq_len = int(seq_len)

    def __len__(self) -> int:
        return len(self.seq)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        row = self.seq[int(index)]
        return {
            "inputs": row[:-1].astype(np.int32),
            "targets": row[1:].astype(np.int32),
            "loss_mask": self.mask[int(index)].astype(np.float32),
            "num_kv_pairs": self.num_kv_pairs[int(index)],
        }

    def __repr__(self) -> str:
        groups = dict(zip(*np.unique(self.num_kv_pairs, return_counts=True)))
        return f"MQARExamples(seq_len={self.seq_len}, examples_per_num_kv_pairs={groups})"
