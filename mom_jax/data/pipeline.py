"""grain input pipelines for MQAR and text, with checkpointable iterators and per-process shards.

Batches are dicts of numpy arrays (``B`` = ``batch_size``, the rows of this process; the global
batch is ``batch_size * process_count``)::

    inputs        int32   [B, T]  token ids
    targets       int32   [B, T]  next-token ids (always valid ids; use loss_mask)
    loss_mask     float32 [B, T]  MQAR: 1 at query positions; text: 1 everywhere (0 on eval padding)
    num_kv_pairs  int32   [B]     MQAR only

Training (:func:`make_train_iterator`): the example set (MQAR: ``num_train_examples`` sequences
generated from ``seed``; text: the packed windows of the training documents) is cut into
``process_count`` disjoint, equally long strided shards (``examples[process_index::process_count]``,
the remainder dropped); each shard is shuffled with ``seed`` (a fresh permutation every epoch),
repeated forever and batched. The returned ``grain.DatasetIterator`` has ``get_state()`` /
``set_state()``: restoring a saved state yields exactly the batches that followed it.

Evaluation (:func:`make_eval_batches`): a finite, deterministic list of global batches (MQAR:
``num_test_examples`` new sequences per value of ``num_kv_pairs``, one value per batch; text: the
validation documents' windows in order). The last batch of a group is padded with rows whose
``loss_mask`` is 0, so every batch has the same shape. With ``process_count > 1`` every process gets
the same number of batches and its own rows of each global batch.
"""

from __future__ import annotations

from typing import Any, Sequence

import grain
import ml_collections
import numpy as np

from mom_jax.data import mqar as mqar_lib
from mom_jax.data import text as text_lib
from mom_jax.data.tokenizer import TOKENIZER_NAMES, get_tokenizer

DATASET_NAMES = ("mqar", "text")
Batch = dict[str, np.ndarray]

# Worker threads and prefetch depth of the training iterator (batches are cheap numpy slices).
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


def default_mqar_config() -> ml_collections.ConfigDict:
    """MQAR defaults (Zoology): vocab 8192, power-law query gaps with a=0.01, random fillers.

    ``num_kv_pairs`` is a tuple: training mixes the values (``num_train_examples`` split evenly over
    them); evaluation generates ``num_test_examples`` per value and reports each. The sequence length
    is an argument of the pipeline functions (it must be >= 4 * max(num_kv_pairs)).
    """
    cfg = ml_collections.ConfigDict()
    cfg.name = "mqar"
    cfg.vocab_size = 8192
    cfg.num_kv_pairs = (4, 8, 16)
    cfg.num_train_examples = 100_000
    cfg.num_test_examples = 1_000
    cfg.power_a = 0.01
    cfg.random_non_queries = True
    return cfg


def default_text_config() -> ml_collections.ConfigDict:
    """Text defaults: Mistral v1 tokenizer on the built-in Shakespeare corpus, 5% held out.

    ``paths``: files / directories / glob patterns (.txt, .jsonl, .parquet, .array_record); empty means
    the built-in corpus. ``text_field``: the jsonl field / parquet column. ``txt_split``: "file" (one
    document per .txt file) or "paragraph" (one per blank-line separated block).
    """
    cfg = ml_collections.ConfigDict()
    cfg.name = "text"
    cfg.tokenizer = "mistral"
    cfg.paths = ()
    cfg.text_field = "text"
    cfg.val_fraction = 0.05
    cfg.txt_split = "file"
    return cfg


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _kv_values(cfg) -> tuple[int, ...]:
    kv = cfg.num_kv_pairs
    if _is_int(kv):
        values = (kv,)
    elif isinstance(kv, (list, tuple)):
        values = tuple(kv)
    else:
        raise ValueError(f"MQAR config: num_kv_pairs must be an int or a list of ints, got {kv!r}")
    if not values:
        raise ValueError("MQAR config: num_kv_pairs is empty")
    for k in values:
        if not _is_int(k) or k < 1:
            raise ValueError(f"MQAR config: num_kv_pairs must be positive ints, got {cfg.num_kv_pairs!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"MQAR config: num_kv_pairs has repeated values: {values}")
    return tuple(int(k) for k in values)


def _require(cfg, *fields: str) -> None:
    missing = [f for f in fields if f not in cfg]
    if missing:
        raise ValueError(f"data config {cfg.get('name')!r} lacks field(s) {missing}")


def validate_config(cfg, *, seq_len: int | None = None, batch_size: int | None = None) -> None:
    """Rejects a bad data config with a clear ValueError, cheaply (no data is built).

    Checks the dataset name and its fields, MQAR's sequence-length / vocabulary constraints, the
    tokenizer name, text paths (existence and extensions), seq_len and batch_size.
    """
    name = cfg.get("name") if hasattr(cfg, "get") else None
    if name not in DATASET_NAMES:
        raise ValueError(f"Unknown dataset name {name!r}; expected one of {DATASET_NAMES}.")
    if seq_len is not None and (not _is_int(seq_len) or seq_len < 1):
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if batch_size is not None:
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if name == "mqar":
        _require(cfg, "vocab_size", "num_kv_pairs", "num_train_examples", "num_test_examples",
                 "power_a")
        kvs = _kv_values(cfg)
        for field in ("num_train_examples", "num_test_examples"):
            if not _is_int(cfg[field]) or cfg[field] < 1:
                raise ValueError(f"MQAR config: {field} must be a positive int, got {cfg[field]!r}")
        if cfg.num_train_examples < len(kvs):
            raise ValueError(f"MQAR config: num_train_examples={cfg.num_train_examples} is fewer than "
                             f"the {len(kvs)} num_kv_pairs values")
        for k in kvs:
            mqar_lib.check_mqar_args(num_examples=1, seq_len=seq_len or 4 * k, num_kv_pairs=k,
                                     vocab_size=cfg.vocab_size, power_a=cfg.power_a)
    else:
        _require(cfg, "tokenizer", "paths", "text_field", "val_fraction")
        if cfg.tokenizer not in TOKENIZER_NAMES:
            raise ValueError(f"Unknown tokenizer {cfg.tokenizer!r}; expected one of {TOKENIZER_NAMES}.")
        if not (isinstance(cfg.val_fraction, (int, float)) and 0.0 <= cfg.val_fraction < 1.0):
            raise ValueError(f"text config: val_fraction must be in [0, 1), got {cfg.val_fraction!r}")
        if cfg.get("txt_split", "file") not in text_lib.TXT_SPLITS:
            raise ValueError(f"text config: unknown txt_split {cfg.txt_split!r}; expected one of "
                             f"{text_lib.TXT_SPLITS}")
        if not isinstance(cfg.text_field, str) or not cfg.text_field:
            raise ValueError(f"text config: text_field must be a non-empty string, got {cfg.text_field!r}")
        paths = _paths(cfg)
        if paths:
            text_lib.resolve_paths(paths)


def _paths(cfg) -> tuple[str, ...]:
    paths = cfg.paths
    if paths is None:
        return ()
    if isinstance(paths, str):
        return (paths,) if paths else ()
    return tuple(str(p) for p in paths)


def get_vocab_size(cfg) -> int:
    """The vocabulary size a model needs for this data config (ids are in [0, vocab_size))."""
    validate_config(cfg)
    if cfg.name == "mqar":
        return int(cfg.vocab_size)
    return get_tokenizer(cfg.tokenizer).vocab_size


vocab_size = get_vocab_size


def _check_processes(process_index: int, process_count: int) -> None:
    if not _is_int(process_count) or process_count < 1:
        raise ValueError(f"process_count must be a positive int, got {process_count!r}")
    if not _is_int(process_index) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index!r} not in [0, process_count={process_count})")


def _token_streams(cfg) -> text_lib.TokenStreams:
    return text_lib.load_token_streams(
        tokenizer=cfg.tokenizer, paths=_paths(cfg), text_field=cfg.text_field,
        txt_split=cfg.get("txt_split", "file"), val_fraction=float(cfg.val_fraction))


def _split_evenly(total: int, parts: Sequence[int]) -> dict[int, int]:
    base, extra = divmod(total, len(parts))
    return {k: base + (1 if i < extra else 0) for i, k in enumerate(parts)}


def train_source(cfg, *, seq_len: int, seed: int):
    """The full (unsharded, unshuffled) training example set as a random-access source."""
    validate_config(cfg, seq_len=seq_len)
    if cfg.name == "mqar":
        kvs = _kv_values(cfg)
        return mqar_lib.MQARExamples(
            seed=seed, split="train", num_examples=_split_evenly(cfg.num_train_examples, kvs),
            seq_len=seq_len, vocab_size=cfg.vocab_size, power_a=cfg.power_a,
            random_non_queries=cfg.get("random_non_queries", True))
    streams = _token_streams(cfg)
    source = text_lib.PackedWindows(streams.train, seq_len)
    if len(source) == 0:
        raise ValueError(f"The training text has {len(streams.train)} tokens, fewer than one window of "
                         f"seq_len + 1 = {seq_len + 1}; use a shorter seq_len or more text.")
    return source


def make_train_iterator(cfg, *, batch_size: int, seq_len: int, seed: int, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
    """Infinite, shuffled, checkpointable training iterator of this process's shard.

    Args:
      cfg: data ConfigDict (``default_mqar_config()`` / ``default_text_config()`` or alike).
      batch_size: rows per batch of THIS process (global batch = batch_size * process_count).
      seq_len: T.
      seed: data seed (MQAR examples and the shuffle order).
      process_index, process_count: this process's shard of the examples (disjoint across processes).

    Returns:
      grain DatasetIterator of batches (module docstring); ``get_state()`` is a small dict
      (``{"next_index": n}``) to store with a checkpoint and give back to ``set_state()``.
    """
    validate_config(cfg, seq_len=seq_len, batch_size=batch_size)
    _check_processes(process_index, process_count)
    source = train_source(cfg, seq_len=seq_len, seed=seed)
    per_process = len(source) // process_count
    if per_process < 1:
        raise ValueError(f"{len(source)} training examples cannot be shared by {process_count} "
                         "processes")
    ds = grain.MapDataset.source(source)
    ds = ds[process_index:per_process * process_count:process_count]
    ds = ds.shuffle(seed=int(seed)).repeat(None)
    ds = ds.batch(batch_size, drop_remainder=True)
    return iter(ds.to_iter_dataset(read_options=_READ_OPTIONS))


def _batches(source, indices: np.ndarray, batch_size: int, extra: dict[str, Any] | None = None
             ) -> list[Batch]:
    """Stacks ``source[indices]`` into batches; pads the last one with loss_mask-0 rows."""
    out = []
    for start in range(0, len(indices), batch_size):
        rows = [source[int(i)] for i in indices[start:start + batch_size]]
        batch = {key: np.stack([r[key] for r in rows]) for key in rows[0]}
        pad = batch_size - len(rows)
        if pad:
            for key, value in batch.items():
                filler = np.repeat(value[-1:], pad, axis=0)
                if key == "loss_mask":
                    filler = np.zeros_like(filler)
                batch[key] = np.concatenate([value, filler])
        if extra:
            batch.update(extra)
        out.append(batch)
    return out


def make_eval_batches(cfg, *, batch_size: int, seq_len: int, seed: int, process_index: int = 0,
                      process_count: int = 1, num_batches: int | None = None) -> list[Batch]:
    """Finite, deterministic evaluation batches (module docstring for the format).

    MQAR: for each K in ``num_kv_pairs``, ``num_test_examples`` fresh sequences from ``seed``'s test
    stream (independent of the training set, even for the same seed), in batches that hold only that
    K. Text: the validation windows in order (``seed`` is unused).

    Args:
      batch_size: rows per batch of THIS process; the global batches have
        ``batch_size * process_count`` rows and this process gets rows
        ``[process_index * batch_size, (process_index + 1) * batch_size)`` of each.
      num_batches: keep at most this many (global) batches, the first ones; for MQAR they are shared
        evenly by the K values (at least one batch each) so every K is still reported.

    Returns:
      list of batches, identical for every call with the same arguments.
    """
    validate_config(cfg, seq_len=seq_len, batch_size=batch_size)
    _check_processes(process_index, process_count)
    if num_batches is not None and (not _is_int(num_batches) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    global_batch = batch_size * process_count
    batches: list[Batch] = []
    if cfg.name == "mqar":
        kvs = _kv_values(cfg)
        per_kv = None if num_batches is None else max(1, num_batches // len(kvs))
        for k in kvs:
            n = cfg.num_test_examples
            if per_kv is not None:
                n = min(n, per_kv * global_batch)
            source = mqar_lib.MQARExamples(
                seed=seed, split="test", num_examples={k: n}, seq_len=seq_len,
                vocab_size=cfg.vocab_size, power_a=cfg.power_a,
                random_non_queries=cfg.get("random_non_queries", True))
            batches.extend(_batches(source, np.arange(len(source)), global_batch))
    else:
        streams = _token_streams(cfg)
        if streams.num_val_documents == 0:
            raise ValueError("text config has val_fraction=0: there is no validation split to evaluate")
        source = text_lib.PackedWindows(streams.val, seq_len)
        if len(source) == 0:
            raise ValueError(f"The validation text has {len(streams.val)} tokens, fewer than one window "
                             f"of seq_len + 1 = {seq_len + 1}; raise val_fraction or lower seq_len.")
        n = len(source) if num_batches is None else min(len(source), num_batches * global_batch)
        batches = _batches(source, np.arange(n), global_batch)
    if process_count > 1:
        rows = slice(process_index * batch_size, (process_index + 1) * batch_size)
        batches = [{key: value[rows] for key, value in b.items()} for b in batches]
    return batches


def describe(cfg, *, seq_len: int) -> dict[str, Any]:
    """Sizes of a data config for logs: examples / tokens / documents per split."""
    validate_config(cfg, seq_len=seq_len)
    if cfg.name == "mqar":
        kvs = _kv_values(cfg)
        return {"name": "mqar", "vocab_size": cfg.vocab_size, "num_kv_pairs": kvs,
                "train_examples": cfg.num_train_examples,
                "test_examples": cfg.num_test_examples * len(kvs)}
    streams = _token_streams(cfg)
    return {"name": "text", "tokenizer": cfg.tokenizer,
            "corpus": list(_paths(cfg)) or text_lib.BUILTIN_CORPUS,
            "train_documents": streams.num_train_documents, "val_documents": streams.num_val_documents,
            "train_tokens": int(len(streams.train)), "val_tokens": int(len(streams.val)),
            "train_windows": text_lib.num_windows(len(streams.train), seq_len),
            "val_windows": text_lib.num_windows(len(streams.val), seq_len)}
