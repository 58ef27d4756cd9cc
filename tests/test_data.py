"""Tests of mom_jax.data: MQAR, tokenizers, text packing, user files, grain iterators."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from mom_jax import data
from mom_jax.data import mqar, pipeline, text, tokenizer

# ----------------------------------------------------------------------------------------------------
# MQAR


def _mqar(seed=0, **kw):
    args = dict(num_examples=300, seq_len=64, num_kv_pairs=8, vocab_size=128)
    args.update(kw)
    return data.generate_mqar(np.random.default_rng(seed), **args)


def test_mqar_shapes_and_dtypes():
    d = _mqar()
    assert set(d) == {"inputs", "targets", "loss_mask", "num_kv_pairs"}
    assert d["inputs"].shape == d["targets"].shape == d["loss_mask"].shape == (300, 64)
    assert d["inputs"].dtype == d["targets"].dtype == np.int32
    assert d["loss_mask"].dtype == np.float32
    assert d["num_kv_pairs"].dtype == np.int32 and np.all(d["num_kv_pairs"] == 8)
    assert d["inputs"].min() >= 0 and d["inputs"].max() < 128
    assert d["targets"].min() >= 0 and d["targets"].max() < 128


@pytest.mark.parametrize("random_non_queries", [True, False])
def test_mqar_structure(random_non_queries):
    k, v, t = 8, 128, 64
    d = _mqar(seed=3, num_kv_pairs=k, vocab_size=v, seq_len=t, random_non_queries=random_non_queries)
    x, y, m = d["inputs"], d["targets"], d["loss_mask"]
    np.testing.assert_array_equal(y[:, :-1], x[:, 1:])            # next-token labels
    assert set(np.unique(m)) <= {0.0, 1.0}
    for row in range(x.shape[0]):
        keys, values = x[row, 0:2 * k:2], x[row, 1:2 * k:2]
        assert np.all((keys >= 1) & (keys < v // 2)), keys           # lower half (0 is filler)
        assert np.all((values >= v // 2) & (values < v)), values     # upper half
        assert len(set(keys)) == k and len(set(values)) == k
        pairs = dict(zip(keys.tolist(), values.tolist()))
        q = np.flatnonzero(m[row])
        assert len(q) == k                                           # one query per key
        assert np.all(q >= 2 * k) and np.all((q - 2 * k) % 2 == 0)
        assert sorted(x[row, q].tolist()) == sorted(keys.tolist())   # every key queried once
        for pos in q:
            assert y[row, pos] == pairs[int(x[row, pos])]            # answer = earlier paired value
        if not random_non_queries:
            filler = np.ones(t, dtype=bool)
            filler[:2 * k] = False
            filler[q] = False
            filler[q + 1] = False
            assert np.all(x[row, filler] == 0)
    if random_non_queries:
        tail = np.ones_like(m, dtype=bool)
        tail[:, :2 * k] = False
        tail &= m == 0
        assert len(np.unique(x[tail])) > v // 2                      # random fillers over the vocab


def test_mqar_deterministic_per_seed():
    a, b, c = _mqar(seed=5), _mqar(seed=5), _mqar(seed=6)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["inputs"], c["inputs"])
    assert not np.array_equal(a["loss_mask"], c["loss_mask"])


def test_mqar_query_gaps_follow_power_law():
    a, t = 0.3, 64
    d = _mqar(seed=1, num_examples=20000, seq_len=t, num_kv_pairs=1, vocab_size=64, power_a=a)
    gaps = (np.argmax(d["loss_mask"], axis=1) - 2) // 2
    space = (t - 2) // 2
    hist = np.bincount(gaps, minlength=space) / len(gaps)
    p = a * np.arange(1, space + 1) ** (a - 1)
    p /= p.sum()
    np.testing.assert_allclose(hist, p, atol=0.012)
    assert hist[0] > 3 * hist[-1]


def test_mqar_first_key_tends_to_be_queried_first():
    # Zoology: key i takes the i-th draw of the gap law, so the first keys get the short gaps.
    d = _mqar(seed=2, num_examples=2000, seq_len=256, num_kv_pairs=4, vocab_size=64, power_a=0.01)
    x, m = d["inputs"], d["loss_mask"]
    first_key_pos = [np.flatnonzero((x[r] == x[r, 0]) & (m[r] == 1))[0] for r in range(len(x))]
    last_key_pos = [np.flatnonzero((x[r] == x[r, 6]) & (m[r] == 1))[0] for r in range(len(x))]
    assert np.mean(first_key_pos) < np.mean(last_key_pos)


def test_mqar_uniform_keys():
    d = _mqar(seed=0, num_examples=30000, seq_len=8, num_kv_pairs=2, vocab_size=8)
    counts = np.bincount(d["inputs"][:, 0], minlength=4)[1:]
    np.testing.assert_allclose(counts / counts.sum(), 1 / 3, atol=0.02)


def test_mqar_compact_matches_dense():
    seq, qpos = data.generate_mqar_compact(np.random.default_rng(9), num_examples=50, seq_len=40,
                                           num_kv_pairs=5, vocab_size=100)
    d = data.generate_mqar(np.random.default_rng(9), num_examples=50, seq_len=40, num_kv_pairs=5,
                           vocab_size=100)
    np.testing.assert_array_equal(seq[:, :-1], d["inputs"])
    np.testing.assert_array_equal(seq[:, 1:], d["targets"])
    assert np.all(np.take_along_axis(d["loss_mask"], qpos, axis=1) == 1)


@pytest.mark.parametrize("kw, match", [
    (dict(seq_len=31, num_kv_pairs=8), "seq_len=31 is too short"),
    (dict(vocab_size=16, num_kv_pairs=8), "vocab_size=16 is too small"),
    (dict(power_a=0.0), "power_a"),
    (dict(power_a=float("nan")), "power_a"),
    (dict(num_examples=0), "num_examples"),
    (dict(num_kv_pairs=0), "num_kv_pairs"),
])
def test_mqar_argument_errors(kw, match):
    args = dict(num_examples=4, seq_len=64, num_kv_pairs=8, vocab_size=128)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        data.generate_mqar(np.random.default_rng(0), **args)


def test_mqar_needs_generator():
    with pytest.raises(TypeError, match="Generator"):
        data.generate_mqar(0, num_examples=4, seq_len=64, num_kv_pairs=8)


def test_mqar_accuracy_helpers():
    d = _mqar(num_examples=20)
    assert data.query_accuracy(d["targets"], d["targets"], d["loss_mask"]) == 1.0
    wrong = d["targets"].copy()
    q = np.argwhere(d["loss_mask"] == 1)
    wrong[q[::2, 0], q[::2, 1]] = 0                                  # half of the answers wrong
    assert data.query_accuracy(wrong, d["targets"], d["loss_mask"]) == pytest.approx(0.5, abs=0.01)
    by_kv = data.accuracy_by_num_kv_pairs(d["targets"], d)
    assert by_kv == {8: 1.0}


# ----------------------------------------------------------------------------------------------------
# Tokenizers


ROUND_TRIP = ["Hello world", "To be, or not to be: that is the question.\n\nHAMLET\n",
              "  two  spaces\tand a tab ", "é ü ß 漢字 🙂", ""]


def test_mistral_tokenizer():
    tok = data.get_tokenizer("mistral")
    assert tok.vocab_size == 32000
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    path = data.mistral_model_path()
    pkg_dir = pathlib.Path(list(importlib.util.find_spec("mistral_common").submodule_search_locations)[0])
    assert path == pkg_dir / "data" / "tokenizer.model.v1"
    assert tok.encode("Hello world") == [22557, 1526]                # the Mistral / Llama-family pieces
    for s in ROUND_TRIP:
        ids = tok.encode(s)
        assert all(0 <= i < 32000 for i in ids)
        assert tok.decode(ids) == s
    assert tok.encode_batch(ROUND_TRIP) == [tok.encode(s) for s in ROUND_TRIP]
    assert isinstance(tok, data.Tokenizer)


def test_byte_tokenizer():
    tok = data.get_tokenizer("byte")
    assert tok.vocab_size == 259 and {tok.bos_id, tok.eos_id} == {257, 258}
    for s in ROUND_TRIP:
        ids = tok.encode(s)
        assert ids == list(s.encode("utf-8"))
        assert tok.decode(ids) == s
    assert tok.decode([tok.bos_id] + tok.encode("ab") + [tok.eos_id]) == "ab"
    assert isinstance(tok, data.Tokenizer)


def test_tokenizer_errors(monkeypatch):
    with pytest.raises(ValueError, match="Unknown tokenizer 'gpt2'"):
        data.get_tokenizer("gpt2")
    real = importlib.util.find_spec
    monkeypatch.setattr(tokenizer.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mistral_common" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="mistral-common"):
        tokenizer.MistralTokenizer()


# ----------------------------------------------------------------------------------------------------
# Text: packing, corpus, user files


def test_pack_documents_with_eos_between():
    tok = data.get_tokenizer("byte")
    stream = data.tokenize_and_pack(["ab", "cde", "f"], tok)
    e = tok.eos_id
    np.testing.assert_array_equal(stream, [97, 98, e, 99, 100, 101, e, 102, e])
    assert stream.dtype == np.int32

    mis = data.get_tokenizer("mistral")
    docs = ["The first document.", "And the second one."]
    stream = data.tokenize_and_pack(docs, mis)
    want = mis.encode(docs[0]) + [mis.eos_id] + mis.encode(docs[1]) + [mis.eos_id]
    np.testing.assert_array_equal(stream, want)


def test_packed_windows_are_contiguous_slices():
    stream = np.arange(1000, 1103, dtype=np.int32)                  # 103 tokens
    w = data.PackedWindows(stream, 10)
    assert len(w) == 10                                              # (103 - 1) // 10
    for i in range(len(w)):
        ex = w[i]
        np.testing.assert_array_equal(ex["inputs"], stream[10 * i:10 * i + 10])
        np.testing.assert_array_equal(ex["targets"], stream[10 * i + 1:10 * i + 11])
        assert ex["loss_mask"].dtype == np.float32 and np.all(ex["loss_mask"] == 1)
    with pytest.raises(IndexError):
        w[10]


def test_builtin_corpus():
    docs = data.builtin_corpus_documents()
    assert len(docs) == 38
    hamlet = [d for d in docs if d.startswith("Hamlet")]
    assert len(hamlet) == 1 and "To be, or not to be" in hamlet[0]
    joined = "".join(docs)
    assert "**" not in joined and "_" not in joined and "\\[" not in joined
    assert 4_500_000 < len(joined) < 5_500_000


def test_split_documents():
    docs = [f"d{i}" for i in range(10)]
    assert data.split_documents(docs, 0.0) == (docs, [])
    assert data.split_documents(docs, 0.15) == (docs[:8], docs[8:])  # ceil(1.5) = 2 held out
    with pytest.raises(ValueError, match="leaves no training document"):
        data.split_documents(["only one"], 0.1)
    with pytest.raises(ValueError, match="val_fraction"):
        data.split_documents(docs, 1.0)


def _write_user_files(tmp: pathlib.Path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from array_record.python import array_record_module

    (tmp / "a.txt").write_text("First text file.\n\nSecond paragraph.\n", encoding="utf-8")
    (tmp / "b.jsonl").write_text(
        "\n".join(json.dumps(r) for r in [{"text": "json one", "id": 1}, {"text": "json two"},
                                          {"text": ""}]) + "\n\n", encoding="utf-8")
    pq.write_table(pa.table({"text": ["parquet one", None, "parquet two"], "n": [1, 2, 3]}),
                   tmp / "c.parquet")
    writer = array_record_module.ArrayRecordWriter(str(tmp / "d.array_record"), "group_size:1")
    for s in ["record one ✓", "record two"]:
        writer.write(s.encode("utf-8"))
    writer.close()


def test_user_file_types(tmp_path):
    _write_user_files(tmp_path)
    assert data.read_documents(tmp_path / "a.txt") == ["First text file.\n\nSecond paragraph.\n"]
    assert data.read_documents(tmp_path / "a.txt", txt_split="paragraph") == [
        "First text file.", "Second paragraph."]
    assert data.read_documents(tmp_path / "b.jsonl") == ["json one", "json two"]
    assert data.read_documents(tmp_path / "c.parquet") == ["parquet one", "parquet two"]
    assert data.read_documents(tmp_path / "d.array_record") == ["record one ✓", "record two"]
    # a directory, a glob and a file, in the given order
    docs = data.load_documents([str(tmp_path / "d.array_record"), str(tmp_path / "*.jsonl")])
    assert docs == ["record one ✓", "record two", "json one", "json two"]
    assert len(data.load_documents([str(tmp_path)])) == 1 + 2 + 2 + 2


def test_user_files_custom_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "abc"}) + "\n")
    pq.write_table(pa.table({"body": ["def"]}), tmp_path / "y.parquet")
    assert data.read_documents(tmp_path / "x.jsonl", text_field="body") == ["abc"]
    assert data.read_documents(tmp_path / "y.parquet", text_field="body") == ["def"]
    with pytest.raises(KeyError, match="no field 'text'"):
        data.read_documents(tmp_path / "x.jsonl")
    with pytest.raises(KeyError, match="no column 'text'"):
        data.read_documents(tmp_path / "y.parquet")


def test_user_file_errors(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json}\n')
    (tmp_path / "num.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_documents([str(tmp_path / "missing.txt")])
    with pytest.raises(FileNotFoundError, match="matches no file"):
        data.load_documents([str(tmp_path / "*.parquet")])
    with pytest.raises(ValueError, match="Unsupported data file .*x.csv"):
        data.load_documents([str(tmp_path / "x.csv")])
    with pytest.raises(ValueError, match="not valid UTF-8"):
        data.read_documents(tmp_path / "bad.txt")
    with pytest.raises(ValueError, match="bad.jsonl:2: invalid JSON"):
        data.read_documents(tmp_path / "bad.jsonl")
    with pytest.raises(TypeError, match="must be a string"):
        data.read_documents(tmp_path / "num.jsonl")


def test_text_pipeline_on_user_files(tmp_path):
    """Each supported file type through the whole pipeline: windows cover the packed stream."""
    _write_user_files(tmp_path)
    for pattern in ["*.txt", "*.jsonl", "*.parquet", "*.array_record"]:
        cfg = data.default_text_config()
        cfg.tokenizer = "byte"
        cfg.paths = [str(tmp_path / pattern)]
        cfg.val_fraction = 0.0
        cfg.txt_split = "paragraph"
        docs = data.load_documents(cfg.paths, txt_split="paragraph")
        stream = data.tokenize_and_pack(docs, data.get_tokenizer("byte"))
        t = 4
        n = (len(stream) - 1) // t
        it = data.make_train_iterator(cfg, batch_size=1, seq_len=t, seed=0)
        got = []
        for _ in range(n):
            b = next(it)
            assert b["inputs"].shape == (1, t) and b["inputs"].dtype == np.int32
            np.testing.assert_array_equal(b["targets"][0, :-1], b["inputs"][0, 1:])
            got.append(tuple(b["inputs"][0]) + (int(b["targets"][0, -1]),))
        want = [tuple(stream[s:s + t + 1]) for s in range(0, n * t, t)]
        assert sorted(got) == sorted(want), pattern                  # one epoch = every window once


# ----------------------------------------------------------------------------------------------------
# Pipelines: configs, iterators, state, sharding, evaluation


def _tiny_mqar_cfg(**kw):
    cfg = data.default_mqar_config()
    cfg.vocab_size = 64
    cfg.num_kv_pairs = [2, 4]
    cfg.num_train_examples = 100
    cfg.num_test_examples = 10
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def _byte_text_cfg():
    cfg = data.default_text_config()
    cfg.tokenizer = "byte"
    return cfg


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_default_configs():
    data.validate_config(data.default_mqar_config(), seq_len=64)
    data.validate_config(data.default_text_config(), seq_len=2048)
    assert data.get_vocab_size(data.default_mqar_config()) == 8192
    assert data.get_vocab_size(data.default_text_config()) == 32000
    assert pipeline.vocab_size(_byte_text_cfg()) == 259


def test_mqar_train_iterator_batches():
    cfg = _tiny_mqar_cfg()
    it = data.make_train_iterator(cfg, batch_size=8, seq_len=16, seed=0)
    b = next(it)
    assert b["inputs"].shape == b["targets"].shape == b["loss_mask"].shape == (8, 16)
    assert b["inputs"].dtype == np.int32 and b["targets"].dtype == np.int32
    assert b["loss_mask"].dtype == np.float32
    assert b["num_kv_pairs"].shape == (8,) and b["num_kv_pairs"].dtype == np.int32
    np.testing.assert_array_equal(b["loss_mask"].sum(1), b["num_kv_pairs"])
    kvs = np.concatenate([next(it)["num_kv_pairs"] for _ in range(12)])
    assert set(kvs.tolist()) == {2, 4}                               # a mixture
    assert abs(np.mean(kvs == 2) - 0.5) < 0.2


@pytest.mark.parametrize("kind", ["mqar", "text"])
def test_iterator_state_restore(kind):
    if kind == "mqar":
        cfg, t = _tiny_mqar_cfg(), 16                                 # 100 examples: 12 batches/epoch
    else:
        cfg, t = _byte_text_cfg(), 64
    make = lambda: data.make_train_iterator(cfg, batch_size=8, seq_len=t, seed=1)
    it = make()
    _take(it, 10)
    state = it.get_state()
    json.dumps(state)                                                # storable as JSON
    after = _take(it, 6)                                             # crosses an epoch for MQAR
    fresh = make()
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 6), after)
    fresh.set_state(state)                                           # restore twice: same again
    _assert_batches_equal(_take(fresh, 2), after[:2])
    # the restored position is not the start
    assert not np.array_equal(make().__next__()["inputs"], after[0]["inputs"])


def test_iterator_determinism_and_seed():
    cfg = _tiny_mqar_cfg()
    a = _take(data.make_train_iterator(cfg, batch_size=4, seq_len=16, seed=3), 3)
    b = _take(data.make_train_iterator(cfg, batch_size=4, seq_len=16, seed=3), 3)
    c = _take(data.make_train_iterator(cfg, batch_size=4, seq_len=16, seed=4), 3)
    _assert_batches_equal(a, b)
    assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])


def _rows(batches):
    return [r.tobytes() for b in batches for r in np.concatenate([b["inputs"], b["targets"]], 1)]


@pytest.mark.parametrize("kind", ["mqar", "text"])
def test_process_sharding_is_disjoint(kind):
    if kind == "mqar":
        cfg, t = _tiny_mqar_cfg(), 16
        total = 100
    else:
        cfg, t = _byte_text_cfg(), 512
        total = data.describe(cfg, seq_len=t)["train_windows"]
    pc, bs = 2, 2
    per = total // pc
    steps = per // bs                                                # one epoch of each shard
    shards = [_rows(_take(data.make_train_iterator(cfg, batch_size=bs, seq_len=t, seed=0,
                                                   process_index=p, process_count=pc), steps))
              for p in range(pc)]
    for rows in shards:
        assert len(set(rows)) == len(rows) == steps * bs             # no repeats within an epoch
    assert not set(shards[0]) & set(shards[1])                       # disjoint
    src = data.train_source(cfg, seq_len=t, seed=0)
    everything = {np.concatenate([src[i]["inputs"], src[i]["targets"]]).tobytes()
                  for i in range(len(src))}
    assert set(shards[0]) | set(shards[1]) <= everything


def test_mqar_eval_batches():
    cfg = _tiny_mqar_cfg()
    ev = data.make_eval_batches(cfg, batch_size=4, seq_len=16, seed=0)
    assert len(ev) == 2 * 3                                          # ceil(10 / 4) per K
    for b in ev:
        assert b["inputs"].shape == (4, 16) and b["num_kv_pairs"].shape == (4,)
        assert len(set(b["num_kv_pairs"].tolist())) == 1             # one K per batch
    assert [int(b["num_kv_pairs"][0]) for b in ev] == [2, 2, 2, 4, 4, 4]
    last = ev[2]                                                     # 10 = 4 + 4 + 2: two pad rows
    np.testing.assert_array_equal(last["loss_mask"].sum(1), [2, 2, 0, 0])
    _assert_batches_equal(ev, data.make_eval_batches(cfg, batch_size=4, seq_len=16, seed=0))
    other = data.make_eval_batches(cfg, batch_size=4, seq_len=16, seed=1)
    assert not np.array_equal(ev[0]["inputs"], other[0]["inputs"])
    # test examples are not training examples (same seed)
    src = data.train_source(cfg, seq_len=16, seed=0)
    train_rows = {src[i]["inputs"].tobytes() for i in range(len(src))}
    assert not train_rows & {r.tobytes() for b in ev for r in b["inputs"]}
    # num_batches is shared by the K values; process slices of the global batches
    assert len(data.make_eval_batches(cfg, batch_size=4, seq_len=16, seed=0, num_batches=2)) == 2
    halves = [data.make_eval_batches(cfg, batch_size=2, seq_len=16, seed=0, process_index=p,
                                     process_count=2) for p in range(2)]
    for b, h0, h1 in zip(ev, *halves):
        np.testing.assert_array_equal(np.concatenate([h0["inputs"], h1["inputs"]]), b["inputs"])


def test_text_eval_batches_and_corpus_sizes():
    cfg = _byte_text_cfg()
    info = data.describe(cfg, seq_len=256)
    assert info["train_documents"] == 36 and info["val_documents"] == 2
    ev = data.make_eval_batches(cfg, batch_size=16, seq_len=256, seed=0)
    assert len(ev) == -(-info["val_windows"] // 16)
    streams = text.load_token_streams(tokenizer="byte", val_fraction=0.05)
    flat = np.concatenate([b["inputs"] for b in ev])[:info["val_windows"]]
    np.testing.assert_array_equal(flat.reshape(-1), streams.val[:info["val_windows"] * 256])
    pad = ev[-1]["loss_mask"].sum(1)
    assert np.all(pad[:info["val_windows"] % 16 or 16] == 256) and np.all(pad[info["val_windows"] % 16 or 16:] == 0)
    assert len(data.make_eval_batches(cfg, batch_size=16, seq_len=256, seed=0, num_batches=2)) == 2
    # validation documents are disjoint from the training ones
    tr = bytes(np.asarray(streams.train, dtype=np.uint8)[streams.train < 256])
    assert b"ROMEO" in bytes(np.asarray(streams.val, dtype=np.uint8)[streams.val < 256])
    assert b"Romeo and Juliet" not in tr


def test_text_pipeline_mistral_builtin_corpus():
    cfg = data.default_text_config()                                 # Mistral tokenizer, Shakespeare
    info = data.describe(cfg, seq_len=512)
    assert 1_400_000 < info["train_tokens"] < 1_700_000
    it = data.make_train_iterator(cfg, batch_size=2, seq_len=512, seed=0)
    b = next(it)
    assert b["inputs"].shape == (2, 512) and b["inputs"].max() < 32000
    tok = data.get_tokenizer("mistral")
    assert len(tok.decode(b["inputs"][0])) > 1000


@pytest.mark.parametrize("mutate, match", [
    (lambda c: c.update(name="wikitext"), "Unknown dataset name 'wikitext'"),
    (lambda c: c.update(tokenizer="gpt2"), "Unknown tokenizer 'gpt2'"),
    (lambda c: c.update(val_fraction=1.5), "val_fraction"),
    (lambda c: c.update(txt_split="lines"), "txt_split"),
    (lambda c: c.update(paths=("/nonexistent/file.txt",)), "does not exist"),
    (lambda c: c.update(paths=("/nonexistent/*.jsonl",)), "matches no file"),
])
def test_text_config_errors(mutate, match):
    cfg = data.default_text_config()
    mutate(cfg)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        data.make_train_iterator(cfg, batch_size=2, seq_len=16, seed=0)


def test_mqar_config_errors():
    cfg = _tiny_mqar_cfg(num_kv_pairs=[4, 8])
    with pytest.raises(ValueError, match="seq_len=16 is too short for num_kv_pairs=8"):
        data.make_train_iterator(cfg, batch_size=2, seq_len=16, seed=0)
    with pytest.raises(ValueError, match="vocab_size=8 is too small"):
        data.validate_config(_tiny_mqar_cfg(vocab_size=8), seq_len=64)
    with pytest.raises(ValueError, match="num_kv_pairs"):
        data.validate_config(_tiny_mqar_cfg(num_kv_pairs=[4, 4]), seq_len=64)
    with pytest.raises(ValueError, match="batch_size"):
        data.make_train_iterator(_tiny_mqar_cfg(), batch_size=0, seq_len=16, seed=0)
    with pytest.raises(ValueError, match="process_index"):
        data.make_train_iterator(_tiny_mqar_cfg(), batch_size=2, seq_len=16, seed=0,
                                 process_index=2, process_count=2)
    with pytest.raises(ValueError, match="val_fraction=0"):
        cfg = _byte_text_cfg()
        cfg.val_fraction = 0.0
        data.make_eval_batches(cfg, batch_size=2, seq_len=16, seed=0)
    with pytest.raises(ValueError, match="fewer than one window"):
        data.make_train_iterator(_byte_text_cfg(), batch_size=2, seq_len=10_000_000, seed=0)


def test_mqar_module_reexports():
    assert data.MQARExamples is mqar.MQARExamples
    assert data.SUPPORTED_EXTENSIONS == (".txt", ".jsonl", ".parquet", ".array_record")


def test_mqar_single_int_num_kv_pairs():
    cfg = data.default_mqar_config()
    del cfg["num_kv_pairs"]
    cfg.num_kv_pairs = 3                                            # an int instead of a list
    cfg.num_train_examples, cfg.num_test_examples, cfg.vocab_size = 20, 4, 32
    b = next(data.make_train_iterator(cfg, batch_size=4, seq_len=12, seed=0))
    assert np.all(b["num_kv_pairs"] == 3) and np.all(b["loss_mask"].sum(1) == 3)
    ev = data.make_eval_batches(cfg, batch_size=4, seq_len=12, seed=0)
    assert len(ev) == 1 and np.all(ev[0]["num_kv_pairs"] == 3)
