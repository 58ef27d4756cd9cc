"""Generate text with a trained language model (or random weights for a smoke run).

  python -m experiments.generate --workdir=runs/lm_340m_mom --prompt="To be, or not to be"
      [--step=N] [--max_new_tokens=128] [--temperature=0.8] [--top_k=0] [--top_p=0.95] [--seed=0]
  python -m experiments.generate --random_init --config=experiments/configs/lm_340m.py \\
      --config.model.num_layers=2 --prompt="Hello"

The tokenizer is the run's data tokenizer (``config.data.tokenizer``); for MQAR runs (no tokenizer)
the prompt is a space-separated list of token ids and ids are printed.  The prompt is prefixed with
the tokenizer's BOS token (the text pipeline starts documents with it); generation stops at EOS
(``--stop_at_eos``).

Streaming: the jit-compiled decode loop (``mom_jax.decoding``) runs in blocks of ``--block_size``
tokens; after each block the new tokens are decoded and printed.  Blocks keep all per-token work
inside one compiled while_loop (no host round trip per token, no recompiles: the block length is a
traced value); a host callback per token (io_callback) would sync the device every token.  The
printed text is the decode of all tokens so far minus what was already printed (SentencePiece
merges pieces, so decoding piece by piece would lose spaces).
"""
from __future__ import annotations

import json
import os
import sys
import time

import ml_collections
from absl import app, flags
from flax import nnx

from experiments.train import ConfigError, build_model_config   # also defines --config
from mom_jax.decoding import Decoder, SamplingConfig
from mom_jax.models import LanguageModel

flags.DEFINE_string("workdir", None, "training run's workdir (config.json + checkpoints/)")
flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
flags.DEFINE_bool("random_init", False, "random weights from --config (smoke run)")
flags.DEFINE_string("prompt", "", "the prompt (text; token ids for MQAR runs)")
flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate")
flags.DEFINE_float("temperature", 1.0, "0 = greedy")
flags.DEFINE_integer("top_k", 0, "0 = off")
flags.DEFINE_float("top_p", 1.0, "nucleus mass in (0, 1]; 1 = off")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.DEFINE_integer("block_size", 8, "decode steps per streamed block")
flags.DEFINE_bool("stop_at_eos", True, "stop at the tokenizer's EOS token")
flags.DEFINE_bool("bos", True, "prefix the prompt with the tokenizer's BOS token")
flags.DEFINE_string("dtype", None, "override the compute dtype (float32 / bfloat16)")
F = flags.FLAGS


class UsageError(ValueError):
    pass


def load_model(config, workdir: str | None, step: int | None) -> tuple[LanguageModel, int | None]:
    """Builds the model of ``config``; restores its parameters from ``workdir``'s checkpoint."""
    try:
        model_cfg = build_model_config(config.model)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    if F.dtype:
        import dataclasses   # pylint: disable=import-outside-toplevel
        model_cfg = dataclasses.replace(model_cfg, dtype=F.dtype)
    model = LanguageModel(model_cfg, rngs=nnx.Rngs(config.train.seed if "train" in config else 0))
    if workdir is None:
        return model, None
    from mom_jax.training import checkpoint, optim   # pylint: disable=import-outside-toplevel
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    tr = config.train
    tx, _ = optim.make_optimizer(peak_lr=tr.lr, warmup_steps=tr.warmup_steps,
                                 total_steps=tr.steps, min_lr_ratio=tr.min_lr_ratio, b1=tr.b1,
                                 b2=tr.b2, weight_decay=tr.weight_decay, clip_norm=tr.clip_norm)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    params, _, at_step, _ = ckpt.restore(step, params=params, opt_state=tx.init(params))
    ckpt.close()
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state), at_step


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if bool(F.workdir) == bool(F.random_init):
        raise app.UsageError("pass either --workdir=<training run> or --random_init --config=...")
    if F.random_init:
        if F.config is None:
            raise app.UsageError("--random_init needs --config=<config file>")
        config = F.config
    else:
        path = os.path.join(F.workdir, "config.json")
        if not os.path.exists(path):
            print(f"error: {path} not found: is {F.workdir} a training workdir?", file=sys.stderr)
            sys.exit(2)
        with open(path) as f:
            config = ml_collections.ConfigDict(json.load(f))
    try:
        sampling = SamplingConfig(temperature=F.temperature, top_k=F.top_k, top_p=F.top_p)
        model, at_step = load_model(config, F.workdir, F.step)
        tok = None
        if config.data.name == "text":
            from mom_jax.data.tokenizer import get_tokenizer   # pylint: disable=import-outside-toplevel
            tok = get_tokenizer(config.data.tokenizer)
            if tok.vocab_size > model.cfg.vocab_size:
                raise UsageError(f"tokenizer vocab ({tok.vocab_size}) exceeds the model's "
                                 f"({model.cfg.vocab_size})")
            ids = ([tok.bos_id] if F.bos else []) + tok.encode(F.prompt)
            stop = [tok.eos_id] if F.stop_at_eos else []
        else:
            try:
                ids = [int(x) for x in F.prompt.split()]
            except ValueError:
                raise UsageError("this run has no tokenizer: --prompt must be token ids, e.g. "
                                 "--prompt='3 17 42'") from None
            stop = []
        if not ids:
            raise UsageError("empty prompt (pass --prompt, or keep --bos)")
        dec = Decoder(model)
        src = f"step {at_step} of {F.workdir}" if F.workdir else "random weights"
        print(f"[{src}; {model.cfg.mixer} x{model.cfg.num_layers}, {len(ids)} prompt tokens, "
              f"{sampling}]", file=sys.stderr)
        body = [x for x in ids if tok is None or x != tok.bos_id]
        printed = [tok.decode(body) if tok is not None else F.prompt]
        sys.stdout.write(printed[0])
        sys.stdout.flush()
        generated: list[int] = []
        t0 = time.perf_counter()

        def on_tokens(new):
            generated.extend(int(x) for x in new[0])
            if tok is None:
                text = "".join(f" {x}" for x in new[0])
            else:
                # decode prompt + everything so far and print the new suffix (SentencePiece
                # merges pieces and drops a leading space when decoding a piece alone)
                full = tok.decode(body + [x for x in generated if x != tok.eos_id])
                text = full[len(printed[0]):]
                printed[0] = full
            sys.stdout.write(text)
            sys.stdout.flush()

        res = dec.generate([ids], max_new_tokens=F.max_new_tokens, sampling=sampling,
                           stop_tokens=stop, seed=F.seed, block_size=F.block_size,
                           callback=on_tokens)
        dt = time.perf_counter() - t0
        sys.stdout.write("\n")
        n = int(res.num_generated[0])
        print(f"[{n} tokens in {dt:.2f}s (incl. compilation)"
              f"{', stopped at EOS' if res.stopped[0] else ''}]", file=sys.stderr)
    except (UsageError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
