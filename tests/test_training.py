"""Training system: models, one step of every mixer, learning, exact resume, config errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import train as train_lib
from experiments.configs import common, mqar_tiny
from mom_jax.models import LanguageModel, ModelConfig
from mom_jax.training import optim, steps


def tiny_model(**kw):
    base = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, head_dim=16,
                num_memories=3, topk=2, chunk_size=8, attn_num_heads=2, attn_head_dim=16,
                dtype="float32")
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("kw", [dict(mixer="mom"), dict(mixer="gated_deltanet"),
                                dict(mixer="gla"), dict(mixer="attention"),
                                dict(mixer="mom", attention_every=2),
                                dict(mixer="mom", dtype="bfloat16", tie_embeddings=False)])
def test_one_train_step_of_every_mixer(kw):
    cfg = tiny_model(**kw)
    model_fn, params = steps.ModelFn.from_module(LanguageModel(cfg, rngs=nnx.Rngs(0)))
    tx, _ = optim.make_optimizer(peak_lr=1e-2, warmup_steps=0, total_steps=10, min_lr_ratio=0.1,
                                 b1=0.9, b2=0.95, weight_decay=0.01, clip_norm=1.0)
    opt = tx.init(params)
    rng = np.random.default_rng(0)
    tok = rng.integers(0, 64, (4, 17)).astype(np.int32)
    batch = dict(inputs=jnp.asarray(tok[:, :-1]), targets=jnp.asarray(tok[:, 1:]),
                 loss_mask=jnp.ones((4, 16), jnp.float32))
    step = jax.jit(steps.make_train_step(model_fn, tx, topk=cfg.topk, aux_weight=0.01,
                                         grad_accum=2))
    new_params, opt, m = step(params, opt, batch)
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
    changed = [not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(params), jax.tree.leaves(new_params))]
    assert all(changed)
    n_mom = cfg.layer_mixers().count("mom")
    assert ("aux" in m) == (n_mom > 0)
    if n_mom:
        assert m["router_load"].shape == (n_mom, cfg.num_memories)
        np.testing.assert_allclose(np.sum(m["router_load"], -1), 1.0, rtol=1e-5)


def test_grad_accumulation_matches_full_batch():
    cfg = tiny_model()
    model_fn, params = steps.ModelFn.from_module(LanguageModel(cfg, rngs=nnx.Rngs(1)))
    tx = optax.sgd(1.0)   # parameter change == gradient (Adam would amplify rounding noise)
    rng = np.random.default_rng(1)
    tok = rng.integers(0, 64, (4, 17)).astype(np.int32)
    batch = dict(inputs=jnp.asarray(tok[:, :-1]), targets=jnp.asarray(tok[:, 1:]),
                 loss_mask=jnp.ones((4, 16), jnp.float32))
    outs = [jax.jit(steps.make_train_step(model_fn, tx, topk=2, aux_weight=0.0, grad_accum=a))(
        params, tx.init(params), batch)[0] for a in (1, 2)]
    for x, y in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_weight_decay_mask():
    cfg = tiny_model()
    params = nnx.to_pure_dict(nnx.state(LanguageModel(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    mask = optim.decay_mask(params)
    mixer = mask["blocks"][0]["mixer"]
    assert mixer["A_log"] is False and mixer["dt_bias"] is False
    assert mixer["head"]["o_norm"] is False and mask["final_norm"]["weight"] is False
    assert mixer["k_proj"] is True and mask["embed"] is True


def tiny_config(tmp_path, name, **train_kw):
    config = mqar_tiny.get_config("mom")
    config.workdir = str(tmp_path / name)
    config.model.hidden_size = 32
    config.model.num_layers = 1
    config.model.head_dim = 16
    config.model.chunk_size = 16
    config.data.num_train_examples = 256
    config.data.num_test_examples = 32
    config.data.num_kv_pairs = [4]
    tr = dict(batch_size=8, seq_len=64, steps=6, warmup_steps=1, log_every=1, eval_every=0,
              eval_batches=1, checkpoint_every=2)
    tr.update(train_kw)
    for k, v in tr.items():
        config.train[k] = v
    return config


def read_losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def test_resume_continues_exactly(tmp_path):
    full = tiny_config(tmp_path, "full")
    train_lib.train(full)
    part = tiny_config(tmp_path, "part", stop_at_step=3)
    assert train_lib.train(part) == dict(stopped_at=3)
    part.train.stop_at_step = 0
    part.resume = True
    train_lib.train(part)
    a, b = read_losses(full.workdir), read_losses(part.workdir)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for s in range(1, 7):
        np.testing.assert_allclose(b[s], a[s], rtol=1e-6, err_msg=f"step {s}")


def test_evaluate_checkpoint_mqar_and_text(tmp_path):
    from experiments import evaluate as evaluate_lib
    from mom_jax.data import pipeline
    config = tiny_config(tmp_path, "mqar_eval", steps=2, checkpoint_every=1)
    train_lib.train(config)
    res = evaluate_lib.run(config.workdir)
    assert res["step"] == 2 and set(res["accuracy_by_kv_pairs"]) == {4}
    assert np.isfinite(res["ppl"]) and 0 <= res["accuracy"] <= 1

    text = tiny_config(tmp_path, "text_eval", steps=2, checkpoint_every=1)
    text.data = pipeline.default_text_config()
    text.data.tokenizer = "byte"
    text.model.vocab_size = 259
    train_lib.train(text)
    res = evaluate_lib.run(text.workdir)
    assert res["recall_hit_tokens"] > 0 and np.isfinite(res["recall_hit_ppl"])
    assert "accuracy_by_kv_pairs" not in res


def test_recall_hit_mask():
    from mom_jax.training.evaluation import recall_hit_mask
    inputs = np.array([[5, 6, 5, 6, 5]])
    targets = np.array([[6, 5, 6, 7, 6]])
    np.testing.assert_array_equal(recall_hit_mask(inputs, targets),
                                  [[False, False, True, False, True]])


def test_loss_decreases_on_tiny_mqar(tmp_path):
    config = tiny_config(tmp_path, "learn", steps=80, warmup_steps=5, log_every=1,
                         checkpoint_every=1000, batch_size=16)
    config.train.lr = 1e-2
    train_lib.train(config)
    losses = read_losses(config.workdir)
    first = np.mean([losses[s] for s in range(1, 6)])
    last = np.mean([losses[s] for s in range(76, 81)])
    # ln(64) = 4.16 at start; learning that answers are values (upper half) alone gives ln(32)
    assert last < first - 0.4, (first, last)


@pytest.mark.parametrize("section,key,value,match", [
    ("model", "mixer", "mamba", "model.mixer must be one of"),
    ("model", "topk", 9, "cannot exceed model.num_memories"),
    ("model", "dtype", "float16", "model.dtype must be one of"),
    ("train", "grad_accum", 3, "must be divisible by train.grad_accum"),
    ("train", "warmup_steps", 1000, "train.warmup_steps must be in"),
    ("train", "batch_size", 0, "train.batch_size must be a positive integer"),
    ("model", "vocab_size", 32, "model.vocab_size is 32"),
])
def test_bad_config_rejected_before_compiling(tmp_path, section, key, value, match):
    config = mqar_tiny.get_config("mom")
    config.workdir = str(tmp_path / "bad")
    config[section][key] = value
    with pytest.raises(train_lib.ConfigError, match=match):
        train_lib.validate(config)


def test_unknown_model_option_rejected():
    with pytest.raises(ValueError, match="unknown model fields"):
        common.model_config(num_experts=4)


@pytest.mark.parametrize("kw", [dict(mixer="mom"), dict(mixer="mom", impl="pallas"),
                                dict(mixer="gated_deltanet"),
                                dict(mixer="gated_deltanet", impl="pallas"),
                                dict(mixer="gla"), dict(mixer="mom", attention_every=2)])
def test_model_is_causal_in_logits_and_gradient(kw):
    """Changing the input tokens from position CUT on changes neither the logits before it nor the
    gradient of a loss on those logits (a forward or backward leak from the future, even by one
    token, would).  MoM's packed stream shifts when later tokens route differently, so
    rounding-level differences are allowed; a leak is O(1)."""
    cfg = tiny_model(chunk_size=16, **kw)   # the Pallas kernels need chunks >= 16
    model_fn, params = steps.ModelFn.from_module(LanguageModel(cfg, rngs=nnx.Rngs(2)))
    n, t, cut = 2, 32, 16
    rng = np.random.default_rng(3)
    inputs = rng.integers(0, 64, (n, t)).astype(np.int32)
    targets = jnp.asarray(rng.integers(0, 64, (n, cut)).astype(np.int32))
    inputs2 = inputs.copy()
    inputs2[:, cut:] = (inputs[:, cut:] + rng.integers(1, 64, (n, t - cut))) % 64

    @jax.jit
    def logits_and_prefix_grad(p, tokens):
        def f(p):
            logits, _ = model_fn(p, tokens)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :cut], targets)
            return jnp.sum(ce), logits
        (_, logits), g = jax.value_and_grad(f, has_aux=True)(p)
        return logits, g

    lg1, g1 = logits_and_prefix_grad(params, jnp.asarray(inputs))
    lg2, g2 = logits_and_prefix_grad(params, jnp.asarray(inputs2))
    assert float(jnp.max(jnp.abs(lg1[:, cut:] - lg2[:, cut:]))) > 1e-2   # the probe does change
    np.testing.assert_allclose(lg1[:, :cut], lg2[:, :cut], rtol=0, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * (1.0 + float(jnp.max(jnp.abs(a)))))
