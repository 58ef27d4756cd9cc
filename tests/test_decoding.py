"""Model-level decoding: prefill + step == forward for every mixer, ragged prompts, sampling, stops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mom_jax.decoding import Decoder, SamplingConfig, sample_logits
from mom_jax.models import LanguageModel, ModelConfig

V = 61
MIXERS = {  # name -> (mixer, attention_every)
    "mom": ("mom", 0), "gated_deltanet": ("gated_deltanet", 0), "gla": ("gla", 0),
    "attention": ("attention", 0), "hybrid": ("mom", 2),
}
_MODELS = {}


def make_model(name: str) -> LanguageModel:
    """Tiny fp32 model; init_std 0.2 so the mixers change the logits a lot (tests can fail)."""
    if name not in _MODELS:
        mixer, every = MIXERS[name]
        cfg = ModelConfig(vocab_size=V, hidden_size=32, num_layers=2, mixer=mixer,
                          attention_every=every, num_heads=2, head_dim=16, num_memories=3, topk=2,
                          chunk_size=8, attn_num_heads=2, attn_head_dim=16, dtype="float32",
                          remat=False, impl="xla", init_std=0.2)
        _MODELS[name] = LanguageModel(cfg, rngs=nnx.Rngs(3))
    return _MODELS[name]


def tokens(shape, seed):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 1, V)


@pytest.mark.parametrize("name", list(MIXERS))
def test_prefill_then_steps_equals_forward(name):
    model = make_model(name)
    t1, t2 = 11, 7
    tok = tokens((2, t1 + t2), seed=1)
    full, _ = model(tok)
    logits1, cache = model.prefill(tok[:, :t1], max_len=t1 + t2)
    step = jax.jit(lambda c, x: model.step(x, c))
    outs = [logits1]
    for t in range(t1, t1 + t2):
        lt, cache = step(cache, tok[:, t])
        outs.append(lt[:, None])
    got = jnp.concatenate(outs, 1)
    np.testing.assert_allclose(got, full, rtol=1e-4, atol=1e-4)
    # the check has teeth: an empty cache at t1 gives clearly different logits
    wrong, _ = model.step(tok[:, t1], model.init_cache(2, t1 + t2))
    assert float(jnp.max(jnp.abs(wrong - full[:, t1]))) > 1e-2


@pytest.mark.parametrize("name", ["mom", "attention"])
def test_prefill_last_only_and_init_cache_steps(name):
    model = make_model(name)
    tok = tokens((2, 9), seed=2)
    full, _ = model(tok)
    last, _ = model.prefill(tok, last_only=True)
    np.testing.assert_allclose(last, full[:, -1], rtol=1e-5, atol=1e-5)
    cache = model.init_cache(2, 9)
    for t in range(9):
        lt, cache = model.step(tok[:, t], cache)
    np.testing.assert_allclose(lt, full[:, -1], rtol=1e-4, atol=1e-4)


def test_forward_signature_unchanged():
    model = make_model("hybrid")
    logits, router = model(tokens((2, 5), seed=3))
    assert logits.shape == (2, 5, V) and len(router) == 1 and router[0].shape == (2, 5, 3)


def test_mom_cache_size_independent_of_generated_tokens():
    dec = Decoder(make_model("mom"))
    prompt = [list(np.asarray(tokens((6,), seed=4)))]
    sizes = []
    for n in (1, 5, 40):
        state = dec.start(prompt, max_new_tokens=n, sampling=SamplingConfig(temperature=0))
        shapes0 = [x.shape for x in jax.tree.leaves(state.cache)]
        state, _ = dec.advance(state, n)
        assert [x.shape for x in jax.tree.leaves(state.cache)] == shapes0
        sizes.append(sum(x.size for x in jax.tree.leaves(state.cache)))
    assert len(set(sizes)) == 1
    # attention KV caches, in contrast, grow with the number of tokens to generate
    dec_a = Decoder(make_model("attention"))
    s1 = dec_a.start(prompt, max_new_tokens=1, sampling=SamplingConfig(temperature=0))
    s2 = dec_a.start(prompt, max_new_tokens=40, sampling=SamplingConfig(temperature=0))
    assert (sum(x.size for x in jax.tree.leaves(s2.cache))
            > sum(x.size for x in jax.tree.leaves(s1.cache)))


@pytest.mark.parametrize("name", ["mom", "gla", "attention", "hybrid"])
def test_greedy_equals_argmax_and_ragged_batch_equals_single(name):
    model = make_model(name)
    dec = Decoder(model)
    rng = np.random.default_rng(5)
    prompts = [list(rng.integers(1, V, n)) for n in (7, 2, 12)]
    n_new = 6
    greedy = SamplingConfig(temperature=0.0)
    batch = dec.generate(prompts, max_new_tokens=n_new, sampling=greedy)
    assert batch.tokens.shape == (3, n_new) and batch.num_generated.tolist() == [n_new] * 3
    for i, p in enumerate(prompts):
        alone = dec.generate([p], max_new_tokens=n_new, sampling=greedy)
        np.testing.assert_array_equal(alone.tokens[0], batch.tokens[i])
        np.testing.assert_allclose(alone.logprobs[0], batch.logprobs[i], atol=1e-4)
        # greedy == argmax of the full forward over prompt + generated tokens
        seq = jnp.asarray([p + list(map(int, batch.tokens[i]))], jnp.int32)
        full, _ = model(seq)
        np.testing.assert_array_equal(np.argmax(full[0, len(p) - 1:-1], -1), batch.tokens[i])
        logp = jax.nn.log_softmax(full[0, len(p) - 1:-1], -1)
        np.testing.assert_allclose(
            np.take_along_axis(np.asarray(logp), batch.tokens[i][:, None], 1)[:, 0],
            batch.logprobs[i], atol=1e-4)


def test_sampling_reproducible_and_block_independent():
    dec = Decoder(make_model("mom"))
    prompts = [[1, 5, 9, 2], [7, 7]]
    cfg = SamplingConfig(temperature=1.5, top_k=20, top_p=0.9)
    a = dec.generate(prompts, max_new_tokens=12, sampling=cfg, seed=7)
    b = dec.generate(prompts, max_new_tokens=12, sampling=cfg, seed=7)
    streamed = []
    c = dec.generate(prompts, max_new_tokens=12, sampling=cfg, seed=7, block_size=3,
                     callback=lambda new: streamed.append([list(map(int, x)) for x in new]))
    d = dec.generate(prompts, max_new_tokens=12, sampling=cfg, seed=8)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.tokens, c.tokens)
    assert not np.array_equal(a.tokens, d.tokens)
    for r in range(2):   # the streamed pieces add up to the result
        assert sum((s[r] for s in streamed), []) == list(map(int, a.tokens[r]))
    assert len(streamed) > 2


def test_sample_logits_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000, jnp.float32))
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)

    def freq(cfg):
        return np.bincount(np.asarray(sample_logits(logits, keys, cfg)), minlength=4) / 4000

    np.testing.assert_allclose(freq(SamplingConfig()), [0.5, 0.3, 0.15, 0.05], atol=0.03)
    assert freq(SamplingConfig(top_k=2))[2:].sum() == 0
    np.testing.assert_allclose(freq(SamplingConfig(top_k=2)), [0.625, 0.375, 0, 0], atol=0.03)
    # top_p = 0.7: {0.5, 0.3} reach it (0.5 alone does not); 0.5 keeps only the top token
    np.testing.assert_allclose(freq(SamplingConfig(top_p=0.7)), [0.625, 0.375, 0, 0], atol=0.03)
    np.testing.assert_array_equal(freq(SamplingConfig(top_p=0.5)), [1, 0, 0, 0])
    np.testing.assert_array_equal(freq(SamplingConfig(temperature=0)), [1, 0, 0, 0])
    assert freq(SamplingConfig(temperature=0.3))[0] > 0.8           # sharper than T=1


def test_stop_tokens():
    dec = Decoder(make_model("gated_deltanet"))
    prompts = [[3, 14, 15], [9, 2, 6, 5, 3]]
    greedy = SamplingConfig(temperature=0)
    free = dec.generate(prompts, max_new_tokens=8, sampling=greedy)
    stop = int(free.tokens[0, 2])            # row 0 emits it at index 2 (maybe earlier)
    first = int(np.argmax(free.tokens[0] == stop))
    res = dec.generate(prompts, max_new_tokens=8, sampling=greedy, stop_tokens=[stop], pad_id=-1)
    assert res.num_generated[0] == first + 1 and res.stopped[0]
    np.testing.assert_array_equal(res.tokens[0, :first + 1], free.tokens[0, :first + 1])
    assert (res.tokens[0, first + 1:] == -1).all() and (res.logprobs[0, first + 1:] == 0).all()
    row1 = list(free.tokens[1])
    n1 = row1.index(stop) + 1 if stop in row1 else 8
    assert res.num_generated[1] == n1
    np.testing.assert_array_equal(res.tokens[1, :n1], free.tokens[1, :n1])
    # all rows stopped -> the loop ends early
    both = dec.generate([prompts[0]] * 2, max_new_tokens=8, sampling=greedy, stop_tokens=[stop])
    assert both.steps == first


def test_bad_arguments():
    dec_a = Decoder(make_model("attention"))
    dec = Decoder(make_model("mom"))
    ok = dict(max_new_tokens=4)
    with pytest.raises(ValueError, match="do not fit the attention KV cache"):
        dec_a.generate([[1] * 10], max_new_tokens=4, max_len=12)
    dec_a.generate([[1] * 10], max_new_tokens=3, max_len=12)      # exactly fits
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        SamplingConfig(top_k=-1)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-0.1)
    with pytest.raises(ValueError, match="exceeds the vocabulary"):
        dec.generate([[1]], sampling=SamplingConfig(top_k=V + 1), **ok)
    with pytest.raises(ValueError, match="at least one token"):
        dec.generate([[1, 2], []], **ok)
    with pytest.raises(ValueError, match="outside"):
        dec.generate([[1, V]], **ok)
    with pytest.raises(ValueError, match="stop tokens"):
        dec.generate([[1]], stop_tokens=[V], **ok)
    with pytest.raises(ValueError, match="max_new_tokens"):
        dec.generate([[1]], max_new_tokens=0)
    with pytest.raises(TypeError, match="list of token-id lists"):
        dec.generate("hello", **ok)
    with pytest.raises(ValueError, match="max_len"):
        make_model("attention").prefill(tokens((1, 8), 0), max_len=4)
    with pytest.raises(ValueError, match="int tokens"):
        make_model("mom").step(jnp.ones((2, 3), jnp.int32), ())


@pytest.mark.parametrize("name", list(MIXERS))
def test_params_for_inference_same_function_in_bf16(name):
    """Casting the matmul weights once (what Decoder does) changes nothing in a bf16 model:
    prefill and steps give bit-identical logits and caches; norm / router / decay parameters
    stay float32."""
    from mom_jax.models import params_for_inference  # noqa: PLC0415
    from mom_jax.models.lm import COMPUTE_DTYPE_PARAMS  # noqa: PLC0415
    mixer, every = MIXERS[name]
    cfg = ModelConfig(vocab_size=V, hidden_size=32, num_layers=2, mixer=mixer,
                      attention_every=every, num_heads=2, head_dim=16, num_memories=3, topk=2,
                      chunk_size=8, attn_num_heads=2, attn_head_dim=16, dtype="bfloat16",
                      remat=False, impl="xla", init_std=0.2)
    graphdef, params = nnx.split(LanguageModel(cfg, rngs=nnx.Rngs(3)))
    cast = params_for_inference(params, jnp.bfloat16)
    leaves = jax.tree_util.tree_flatten_with_path(cast)[0]
    dtypes = {}
    for path, x in leaves:
        dtypes[[k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]] = x.dtype
    assert {n for n, d in dtypes.items() if d == jnp.bfloat16} == set(dtypes) & COMPUTE_DTYPE_PARAMS
    assert all(dtypes[n] == jnp.float32 for n in ("weight", "A_log", "gate") if n in dtypes)
    tok = tokens((2, 12), seed=4)

    def run(p):
        model = nnx.merge(graphdef, p)
        logits, cache = model.prefill(tok[:, :8], max_len=12)
        outs = [logits]
        for t in range(8, 12):
            lt, cache = model.step(tok[:, t], cache)
            outs.append(lt[:, None])
        return jnp.concatenate(outs, 1), cache

    (a, cache_a), (b, cache_b) = jax.jit(run)(params), jax.jit(run)(cast)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for x, y in zip(jax.tree.leaves(cache_a), jax.tree.leaves(cache_b)):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_compute_dtype_param_names_exist():
    """Every name in COMPUTE_DTYPE_PARAMS is a parameter of some model (no silent typos)."""
    from mom_jax.models.lm import COMPUTE_DTYPE_PARAMS  # noqa: PLC0415
    seen = set()
    for name in MIXERS:
        for path, _ in jax.tree_util.tree_flatten_with_path(nnx.state(make_model(name)))[0]:
            seen.update(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    untied = LanguageModel(ModelConfig(vocab_size=V, hidden_size=32, num_layers=1, mixer="mom",
                                       num_heads=2, head_dim=16, num_memories=3, topk=2,
                                       tie_embeddings=False, remat=False),
                           rngs=nnx.Rngs(0))
    seen.update(k.key for path, _ in jax.tree_util.tree_flatten_with_path(nnx.state(untied))[0]
                for k in path if isinstance(k, jax.tree_util.DictKey))
    assert COMPUTE_DTYPE_PARAMS <= seen, COMPUTE_DTYPE_PARAMS - seen
