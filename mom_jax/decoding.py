"""Autoregressive generation for ``LanguageModel``: prefill, a jit-compiled decode loop, sampling.

  dec = Decoder(model)
  res = dec.generate([[1, 851, 22], [1, 9]], max_new_tokens=32,
                     sampling=SamplingConfig(temperature=0.8, top_p=0.95), stop_tokens=[2], seed=0)
  res.tokens        # int32 [B, max_new_tokens], pad_id after a row's stop token / end
  res.num_generated # int32 [B], tokens generated per row (its stop token included)

How it works
------------
* **Prefill**: the model's chunked forward (``LanguageModel.prefill``) over the first ``m`` prompt
  tokens, where ``m`` is the length of the SHORTEST prompt, returns the cache after those tokens
  (recurrent states, conv buffers, KV caches) and the logits of position ``m - 1``.
* **Ragged prompts**: all rows then advance in lock-step, one token per step, through the same
  one-token ``LanguageModel.step``.  At position ``t`` a row whose prompt is longer than ``t`` is
  *forced*: its next input is its own prompt token ``t`` (the sampled token is discarded); a row
  past its prompt samples.  Every row therefore sees exactly its own prompt followed by its own
  samples -- no padding token ever enters a recurrent state (left-padding would feed pad tokens into
  the recurrent memories and the router; right-padding would put them between prompt and answer).
  The price: the part of longer prompts beyond ``m`` runs through the step function instead of the
  chunked prefill (one token at a time).  Rows are independent, so a row's result does not depend
  on the other rows (up to float rounding of prefill vs step: ~1e-6 in float32).
* **Decode loop**: a ``lax.while_loop`` inside one ``jax.jit`` (no Python loop per token).  It runs
  until every row is done (stop token or ``max_new_tokens`` generated) or the requested number of
  steps is reached, so generation can be streamed in blocks: ``Decoder.advance(state, n)`` runs up
  to ``n`` steps and returns the state; ``generate(..., block_size=n, callback=f)`` calls
  ``f(new_tokens_per_row)`` after each block.  The block size is a traced value (no recompiles).
* **Sampling** (``SamplingConfig``): greedy (temperature 0) = argmax; otherwise logits / temperature,
  then top-k, then top-p (nucleus: the smallest set of most likely tokens whose probability reaches
  top_p; the most likely token is always kept), then a categorical draw.  The key of row ``b`` for
  its ``i``-th generated token is ``fold_in(fold_in(key, b), i)``: results are reproducible for a
  seed and independent of the block size and of the other rows' prompt lengths.
* **Stop tokens**: once a row emits one (it is kept in the output), the row is done: its remaining
  outputs are ``pad_id``, its ``num_generated`` and ``logprobs`` stop changing.  Done rows still
  run through the batched step (fed token 0) until the whole batch is done; their outputs are
  ignored.

Memory: the recurrent layers' caches have a fixed size; attention layers hold a KV cache of
``max_len`` slots (default: the longest prompt + max_new_tokens - 1, the most the loop can feed).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mom_jax.models.lm import DTYPES, LanguageModel, params_for_inference


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is drawn from the logits.

    temperature: 0 -> greedy (argmax; top_k / top_p are then ignored); > 0 divides the logits.
    top_k: keep the k most likely tokens (0 = all).  top_p: nucleus mass in (0, 1] (1 = all).
    """
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not np.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_logits(logits, keys, sampling: SamplingConfig):
    """Draws one token per row.

    logits: float [B, V]; keys: [B] PRNG keys (typed or uint32 [B, 2]).  Returns int32 [B].
    """
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    lg = logits.astype(jnp.float32) / sampling.temperature
    neg = jnp.finfo(jnp.float32).min
    if sampling.top_k and sampling.top_k < lg.shape[-1]:
        kth = jax.lax.top_k(lg, sampling.top_k)[0][:, -1:]
        lg = jnp.where(lg < kth, neg, lg)
    if sampling.top_p < 1.0:
        sorted_lg = jnp.sort(lg, axis=-1)[:, ::-1]                                # descending
        probs = jax.nn.softmax(sorted_lg, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < sampling.top_p                                     # first always kept
        cutoff = jnp.min(jnp.where(keep, sorted_lg, jnp.inf), axis=-1, keepdims=True)
        lg = jnp.where(lg < cutoff, neg, lg)
    return jax.vmap(jax.random.categorical)(keys, lg).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Everything the decode loop carries (a pytree; all arrays on device).

    cache: the model cache (tuple of layer caches) after ``t`` tokens.
    t: int32 [] tokens fed to the model so far; ``token`` is the token at position ``t``.
    token: int32 [B] next model input (a forced prompt token, a sample, or 0 for done rows).
    done: bool [B].  num_generated: int32 [B].
    out: int32 [B, N] generated tokens (pad_id where none).  logprobs: float32 [B, N] log-softmax of
      the raw (untempered) logits at each generated token (0 where none).
    prompt: int32 [B, P] right-padded prompts.  lengths: int32 [B] prompt lengths.
    key: the PRNG key of the run.
    """
    cache: tuple
    t: jax.Array
    token: jax.Array
    done: jax.Array
    num_generated: jax.Array
    out: jax.Array
    logprobs: jax.Array
    prompt: jax.Array
    lengths: jax.Array
    key: jax.Array


@dataclasses.dataclass
class GenerationResult:
    """tokens: int32 [B, N] (pad_id after the end); num_generated: int32 [B] (stop token included);
    logprobs: float32 [B, N]; stopped: bool [B] (ended on a stop token); steps: model steps run."""
    tokens: np.ndarray
    num_generated: np.ndarray
    logprobs: np.ndarray
    stopped: np.ndarray
    steps: int

    def sequences(self) -> list[list[int]]:
        """Per row, the generated tokens without padding."""
        return [list(map(int, r[:n])) for r, n in zip(self.tokens, self.num_generated)]


def _as_key(seed):
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return jax.random.PRNGKey(int(seed))
    if isinstance(seed, jax.Array):
        return seed
    raise ValueError(f"seed must be an int or a jax PRNG key, got {type(seed).__name__}")


class Decoder:
    """Jit-compiled generation for one model (parameters are captured at construction).

    Args:
      model: a LanguageModel (its current parameters are used; rebuild the Decoder after changing
        them).
    """

    def __init__(self, model: LanguageModel):
        if not isinstance(model, LanguageModel):
            raise TypeError(f"Decoder needs a LanguageModel, got {type(model).__name__}")
        self.cfg = model.cfg
        self.has_attention = model.has_attention
        self.graphdef, self.params = nnx.split(model)
        # The matmul weights in the compute dtype once, not cast at every token (same function).
        self._run_params = jax.jit(params_for_inference, static_argnums=1)(
            self.params, DTYPES[model.cfg.dtype])
        self._start = jax.jit(self._start_impl,
                              static_argnames=("prefill_len", "max_len", "max_new_tokens",
                                               "sampling", "pad_id"))
        self._advance = jax.jit(self._advance_impl, static_argnames=("sampling", "pad_id"),
                                donate_argnums=(2,))
        self._decode_weights = None   # LanguageModel.decode_weights(), computed on first use

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    # -- traced pieces --------------------------------------------------------------------------
    def _model(self, params) -> LanguageModel:
        return nnx.merge(self.graphdef, params)

    @staticmethod
    def _choose(state: DecodeState, logits, stop_tokens, sampling, pad_id) -> DecodeState:
        """Picks the token at position state.t from the logits of position t - 1 (see module doc)."""
        b, n = state.out.shape
        rows = jnp.arange(b, dtype=jnp.int32)
        t = state.t
        in_prompt = t < state.lengths
        forced = state.prompt[:, jnp.minimum(t, state.prompt.shape[1] - 1)]
        gen_idx = jnp.maximum(t - state.lengths, 0)
        keys = jax.vmap(lambda r, i: jax.random.fold_in(jax.random.fold_in(state.key, r), i))(
            rows, gen_idx)
        sampled = sample_logits(logits, keys, sampling)
        active = ~in_prompt & ~state.done
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), -1),
                                   sampled[:, None], -1)[:, 0]
        slot = jnp.where(active, gen_idx, n)                                   # n = dropped
        out = state.out.at[rows, slot].set(sampled, mode="drop")
        logprobs = state.logprobs.at[rows, slot].set(logp, mode="drop")
        num = state.num_generated + active.astype(jnp.int32)
        hit_stop = jnp.any(sampled[:, None] == stop_tokens[None, :], axis=-1)
        done = state.done | (active & (hit_stop | (num >= n)))
        token = jnp.where(in_prompt, forced, jnp.where(active, sampled, 0))
        return dataclasses.replace(state, token=token.astype(jnp.int32), done=done,
                                   num_generated=num, out=out, logprobs=logprobs)

    def _start_impl(self, params, prompt, lengths, key, stop_tokens, *, prefill_len, max_len,
                    max_new_tokens, sampling, pad_id):
        model = self._model(params)
        b = prompt.shape[0]
        logits, cache = model.prefill(prompt[:, :prefill_len], max_len=max_len, last_only=True)
        state = DecodeState(
            cache=cache, t=jnp.asarray(prefill_len, jnp.int32), token=jnp.zeros((b,), jnp.int32),
            done=jnp.zeros((b,), bool), num_generated=jnp.zeros((b,), jnp.int32),
            out=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
            logprobs=jnp.zeros((b, max_new_tokens), jnp.float32),
            prompt=prompt, lengths=lengths, key=key)
        return self._choose(state, logits, stop_tokens, sampling, pad_id)

    def _advance_impl(self, params, weights, state: DecodeState, stop_tokens, num_steps, *,
                      sampling, pad_id):
        model = self._model(params)

        def cond(carry):
            i, s = carry
            return (i < num_steps) & ~jnp.all(s.done)

        def body(carry):
            i, s = carry
            logits, cache = model.step(s.token, s.cache, weights)
            s = dataclasses.replace(s, cache=cache, t=s.t + 1)
            return i + 1, self._choose(s, logits, stop_tokens, sampling, pad_id)

        steps, state = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state))
        return state, steps

    # -- public API -----------------------------------------------------------------------------
    def check_request(self, prompts, *, max_new_tokens, stop_tokens, max_len, sampling):
        """Validates a request; returns (prompt int32 [B, P], lengths int32 [B], stop int32 [S],
        max_len or None).  Raises ValueError / TypeError with a clear message."""
        if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
            prompts = [list(r) for r in prompts]
        if (not isinstance(prompts, Sequence) or isinstance(prompts, str) or not prompts
                or not all(isinstance(p, (Sequence, np.ndarray)) and not isinstance(p, str)
                           for p in prompts)):
            raise TypeError("prompts must be a non-empty list of token-id lists (one per row)")
        lens = [len(p) for p in prompts]
        if min(lens) < 1:
            raise ValueError("every prompt needs at least one token (e.g. the BOS token)")
        v = self.vocab_size
        for i, p in enumerate(prompts):
            arr = np.asarray(p)
            if not np.issubdtype(arr.dtype, np.integer):
                raise TypeError(f"prompt {i} must hold integer token ids, got dtype {arr.dtype}")
            if arr.min() < 0 or arr.max() >= v:
                raise ValueError(f"prompt {i} has token ids outside [0, vocab_size={v})")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
                or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if not isinstance(sampling, SamplingConfig):
            raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        if sampling.top_k > v:
            raise ValueError(f"top_k ({sampling.top_k}) exceeds the vocabulary size ({v})")
        stop = np.asarray(list(stop_tokens), dtype=np.int64).reshape(-1)
        if stop.size and (stop.min() < 0 or stop.max() >= v):
            raise ValueError(f"stop tokens must be in [0, vocab_size={v}), got {stop.tolist()}")
        p_max = max(lens)
        needed = p_max + int(max_new_tokens) - 1          # the most tokens the loop can feed
        if self.has_attention:
            if max_len is None:
                max_len = needed
            elif isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) \
                    or max_len < 1:
                raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
            elif max_len < needed:
                raise ValueError(
                    f"the longest prompt ({p_max} tokens) + max_new_tokens ({max_new_tokens}) - 1 "
                    f"= {needed} tokens do not fit the attention KV cache (max_len={max_len}); "
                    f"raise max_len or shorten the prompt / max_new_tokens")
            max_len = int(max_len)
        else:
            max_len = None                                  # recurrent caches have a fixed size
        prompt = np.zeros((len(prompts), p_max), np.int32)
        for i, p in enumerate(prompts):
            prompt[i, :len(p)] = np.asarray(p)
        return prompt, np.asarray(lens, np.int32), stop.astype(np.int32), max_len

    def start(self, prompts, *, max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
              stop_tokens: Sequence[int] = (), pad_id: int = 0, seed=0,
              max_len: int | None = None) -> DecodeState:
        """Prefills the common prompt prefix and chooses the first token; returns the DecodeState.

        prompts: list of B token-id lists (lengths may differ, each >= 1).  Other args: see
        ``generate``.
        """
        prompt, lengths, stop, max_len = self.check_request(
            prompts, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens, max_len=max_len,
            sampling=sampling)
        if isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer)):
            raise ValueError(f"pad_id must be an integer, got {pad_id!r}")
        self._request = (jnp.asarray(stop), sampling, int(pad_id))
        return self._start(self._run_params, jnp.asarray(prompt), jnp.asarray(lengths),
                           _as_key(seed), jnp.asarray(stop), prefill_len=int(lengths.min()),
                           max_len=max_len, max_new_tokens=int(max_new_tokens),
                           sampling=sampling, pad_id=int(pad_id))

    def from_cache(self, cache: tuple, tokens, position: int, *, max_new_tokens: int,
                   sampling: SamplingConfig = SamplingConfig(), stop_tokens: Sequence[int] = (),
                   pad_id: int = 0, seed=0) -> DecodeState:
        """A DecodeState that continues from an existing model cache (e.g. one built elsewhere).

        cache: the model cache after ``position`` tokens; tokens: int [B], the token at
        ``position`` (the next model input, not counted as generated).  ``advance`` then generates
        up to ``max_new_tokens`` tokens.  Attention KV caches must have room for them.
        """
        tokens = jnp.asarray(tokens, jnp.int32)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be int [batch], got shape {tokens.shape}")
        b = tokens.shape[0]
        self.check_request([[0]] * b, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens,
                           max_len=None, sampling=sampling)
        stop = jnp.asarray(np.asarray(list(stop_tokens), np.int32).reshape(-1))
        self._request = (stop, sampling, int(pad_id))
        pos = jnp.asarray(position, jnp.int32)
        return DecodeState(
            cache=cache, t=pos, token=tokens, done=jnp.zeros((b,), bool),
            num_generated=jnp.zeros((b,), jnp.int32),
            out=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
            logprobs=jnp.zeros((b, max_new_tokens), jnp.float32),
            prompt=jnp.zeros((b, 1), jnp.int32), lengths=jnp.full((b,), pos, jnp.int32),
            key=_as_key(seed))

    def advance(self, state: DecodeState, num_steps: int) -> tuple[DecodeState, int]:
        """Runs up to ``num_steps`` decode steps (fewer if every row is done) inside one jitted
        while_loop.  ``state`` is donated (do not reuse it).  Returns (new state, steps run)."""
        stop, sampling, pad_id = self._request
        if self._decode_weights is None:  # cast + concatenated once per Decoder, not per token
            self._decode_weights = jax.jit(lambda p: self._model(p).decode_weights())(
                self._run_params)
        state, steps = self._advance(self._run_params, self._decode_weights, state, stop,
                                     jnp.asarray(num_steps, jnp.int32),
                                     sampling=sampling, pad_id=pad_id)
        return state, int(steps)

    def generate(self, prompts, *, max_new_tokens: int,
                 sampling: SamplingConfig = SamplingConfig(), stop_tokens: Sequence[int] = (),
                 pad_id: int = 0, seed=0, max_len: int | None = None,
                 block_size: int | None = None,
                 callback: Callable[[list[np.ndarray]], None] | None = None) -> GenerationResult:
        """Generates up to ``max_new_tokens`` tokens after each prompt.

        Args:
          prompts: list of B token-id lists (different lengths allowed, each >= 1 token).
          max_new_tokens: N >= 1.  sampling: SamplingConfig (default: temperature 1, no top-k/p).
          stop_tokens: ids that end a row (kept in its output).  pad_id: fills the output after a
            row's end.  seed: int or PRNG key.
          max_len: attention KV-cache slots (default: longest prompt + N - 1; error if smaller).
          block_size: with ``callback``, decode steps per jitted block (default 16).
          callback: called after the first token and after each block with, per row, the int32
            array of tokens generated since the last call (streaming).
        Returns:
          GenerationResult.
        """
        if block_size is not None and (isinstance(block_size, bool) or
                                       not isinstance(block_size, (int, np.integer))
                                       or block_size < 1):
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        state = self.start(prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                           stop_tokens=stop_tokens, pad_id=pad_id, seed=seed, max_len=max_len)
        # every row is done after at most (longest prompt - shortest prompt) + N - 1 more steps
        lengths = np.asarray(state.lengths)
        bound = int(lengths.max() - lengths.min()) + int(max_new_tokens) - 1
        total = 0
        if callback is None:
            state, total = self.advance(state, max(bound, 0))
        else:
            block = block_size or 16
            shown = np.zeros(lengths.shape, np.int64)

            def emit():
                out, num = jax.device_get((state.out, state.num_generated))
                callback([out[r, shown[r]:num[r]] for r in range(len(num))])
                shown[:] = num
            emit()
            while total < bound and not bool(jnp.all(state.done)):
                state, steps = self.advance(state, min(block, bound - total))
                total += steps
                emit()
        out, num, lp, done = jax.device_get(
            (state.out, state.num_generated, state.logprobs, state.done))
        stop = np.asarray(self._request[0])
        stopped = np.array([n > 0 and np.isin(o[n - 1], stop) for o, n in zip(out, num)], bool)
        return GenerationResult(tokens=np.asarray(out), num_generated=np.asarray(num),
                                logprobs=np.asarray(lp), stopped=stopped, steps=total)
