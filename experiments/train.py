"""Train a language model (MoM, Gated DeltaNet, GLA, Transformer++ or a hybrid).

  python -m experiments.train --config=experiments/configs/mqar_tiny.py \
      [--config.model.num_memories=8] [--config.workdir=runs/x] [--config.resume=True]

One readable loop: data -> jitted train step -> periodic logging (stdout + <workdir>/metrics.jsonl),
jit-compiled evaluation, and orbax checkpoints (periodic, on SIGTERM/SIGINT, and at the end).
``--config.resume=True`` continues exactly where the latest checkpoint stopped: parameters, optimiser,
step and the data iterator's position.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import app, logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from mom_jax.data import pipeline
from mom_jax.models import LanguageModel, ModelConfig
from mom_jax.training import checkpoint, optim, steps
from mom_jax.training.evaluation import evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                          lock_config=True)


class ConfigError(ValueError):
    """A bad experiment configuration (raised before anything is compiled)."""


def build_model_config(cfg: ml_collections.ConfigDict) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(cfg.keys()) - known
    if unknown:
        raise ConfigError(f"unknown model options: {sorted(unknown)}")
    try:
        return ModelConfig(**cfg.to_dict())
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None


def validate(config) -> ModelConfig:
    """Checks the whole config; returns the ModelConfig.  Raises ConfigError with a clear message."""
    tr = config.train
    if not config.get("workdir"):
        raise ConfigError("config.workdir must be set (where checkpoints and metrics go)")
    for name in ("batch_size", "seq_len", "steps", "log_every", "eval_batches",
                 "checkpoint_every", "keep_checkpoints", "grad_accum"):
        v = tr[name]
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"train.{name} must be a positive integer, got {v!r}")
    if tr.warmup_steps < 0 or tr.warmup_steps >= tr.steps:
        raise ConfigError(f"train.warmup_steps must be in [0, train.steps={tr.steps}), "
                          f"got {tr.warmup_steps}")
    if tr.batch_size % tr.grad_accum:
        raise ConfigError(f"train.batch_size ({tr.batch_size}) must be divisible by "
                          f"train.grad_accum ({tr.grad_accum})")
    n_dev = jax.device_count()
    if (tr.batch_size // tr.grad_accum) % n_dev:
        raise ConfigError(f"the micro-batch (batch_size / grad_accum = "
                          f"{tr.batch_size // tr.grad_accum}) must be divisible by the number of "
                          f"devices ({n_dev})")
    if not tr.lr > 0:
        raise ConfigError(f"train.lr must be > 0, got {tr.lr}")
    if tr.get("stop_at_step", 0) < 0:
        raise ConfigError(f"train.stop_at_step must be >= 0, got {tr.stop_at_step}")
    if tr.aux_weight < 0:
        raise ConfigError(f"train.aux_weight must be >= 0, got {tr.aux_weight}")
    model_cfg = build_model_config(config.model)
    try:
        pipeline.validate_config(config.data, seq_len=tr.seq_len,
                                 batch_size=tr.batch_size // jax.process_count())
        data_vocab = pipeline.get_vocab_size(config.data)
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise ConfigError(f"data: {e}") from None
    if data_vocab > model_cfg.vocab_size:
        raise ConfigError(f"the data uses {data_vocab} token ids but model.vocab_size is "
                          f"{model_cfg.vocab_size}")
    return model_cfg


class Stopper:
    """Turns SIGTERM / SIGINT into a flag the loop checks after each step (then saves and exits)."""

    def __init__(self):
        self.requested = None
        self._previous = {sig: signal.signal(sig, self._handle)
                          for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        del frame
        if self.requested is not None:       # second signal: give up immediately
            sys.exit(128 + signum)
        self.requested = signal.Signals(signum).name


def train(config) -> dict:
    """Runs the experiment described by ``config``; returns the final evaluation."""
    model_cfg = validate(config)
    logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO
    tr = config.train
    workdir = os.path.abspath(config.workdir)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=1))

    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    batch_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    def shard(batch):
        """This process's rows -> global arrays sharded over the 'data' axis of all devices."""
        return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
                for k, v in batch.items() if k != "num_kv_pairs"}

    model = LanguageModel(model_cfg, rngs=nnx.Rngs(tr.seed))
    model_fn, params = steps.ModelFn.from_module(model)
    params = jax.device_put(params, replicated)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    tx, schedule = optim.make_optimizer(
        peak_lr=tr.lr, warmup_steps=tr.warmup_steps, total_steps=tr.steps,
        min_lr_ratio=tr.min_lr_ratio, b1=tr.b1, b2=tr.b2, weight_decay=tr.weight_decay,
        clip_norm=tr.clip_norm)
    opt_state = tx.init(params)
    train_step = jax.jit(steps.make_train_step(model_fn, tx, topk=model_cfg.topk,
                                               aux_weight=tr.aux_weight, grad_accum=tr.grad_accum),
                         donate_argnums=(0, 1))
    eval_step = jax.jit(steps.make_eval_step(model_fn, topk=model_cfg.topk))

    data_iter = pipeline.make_train_iterator(
        config.data, batch_size=tr.batch_size // jax.process_count(), seq_len=tr.seq_len,
        seed=tr.seed, process_index=jax.process_index(), process_count=jax.process_count())
    eval_batches = pipeline.make_eval_batches(
        config.data, batch_size=tr.batch_size // jax.process_count(), seq_len=tr.seq_len,
        seed=tr.seed, process_index=jax.process_index(), process_count=jax.process_count(),
        num_batches=tr.eval_batches)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   max_to_keep=tr.keep_checkpoints,
                                   save_interval_steps=tr.checkpoint_every)
    start = 0
    if config.resume and ckpt.latest_step() is not None:
        params, opt_state, start, data_state = ckpt.restore(None, params=params,
                                                            opt_state=opt_state)
        data_iter.set_state(data_state)
        print(f"resumed from step {start} ({ckpt.directory})", flush=True)
    elif config.resume:
        print(f"--config.resume: no checkpoint in {ckpt.directory}; starting from scratch",
              flush=True)
    print(f"model: {model_cfg.mixer} x {model_cfg.num_layers} layers "
          f"({', '.join(sorted(set(model_cfg.layer_mixers())))}), {n_params / 1e6:.2f}M params; "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}; "
          f"batch {tr.batch_size} x {tr.seq_len}, {tr.steps} steps", flush=True)

    stopper = Stopper()
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    metrics_file = open(metrics_path, "a")

    def log(record):
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()

    step = start
    window_t0, window_tokens = time.perf_counter(), 0.0
    last = None
    while step < tr.steps:
        batch = next(data_iter)
        params, opt_state, metrics = train_step(params, opt_state, shard(batch))
        step += 1
        window_tokens += float(tr.batch_size * tr.seq_len)
        if step % tr.log_every == 0 or step == tr.steps or step == start + 1:
            m = jax.device_get(metrics)
            dt = time.perf_counter() - window_t0
            rec = dict(step=step, loss=float(m["loss"]), ce=float(m["ce"]),
                       accuracy=float(m["accuracy"]), grad_norm=float(m["grad_norm"]),
                       lr=float(schedule(step - 1)), tokens_per_s=window_tokens / dt,
                       step_time_s=dt / max(1, window_tokens / (tr.batch_size * tr.seq_len)))
            if "aux" in m:
                rec["aux"] = float(m["aux"])
                rec["router_load"] = np.round(np.asarray(m["router_load"]), 4).tolist()
            if not np.isfinite(rec["loss"]):
                raise FloatingPointError(f"loss is {rec['loss']} at step {step}; stopping "
                                         f"(last checkpoint: {ckpt.latest_step()})")
            log(rec)
            load = ""
            if "router_load" in rec:
                load = " load[L0]=" + "/".join(f"{x:.2f}" for x in rec["router_load"][0])
            note = " (incl. compilation)" if step == start + 1 else ""
            print(f"step {step:>6}/{tr.steps} loss {rec['loss']:.4f} acc {rec['accuracy']:.3f} "
                  f"gnorm {rec['grad_norm']:.2f} lr {rec['lr']:.2e} "
                  f"{rec['tokens_per_s']:,.0f} tok/s {1e3 * rec['step_time_s']:.0f} ms/step{note}"
                  + (f" aux {rec['aux']:.3f}" + load if "aux" in rec else ""), flush=True)
            window_t0, window_tokens = time.perf_counter(), 0.0
        if tr.eval_every and step % tr.eval_every == 0 and step < tr.steps:
            last = evaluate(eval_step, params, eval_batches, shard)
            log(dict(step=step, eval=last))
            print(f"  eval @ {step}: {json.dumps(last)}", flush=True)
        if tr.get("stop_at_step", 0) and step >= tr.stop_at_step and step < tr.steps:
            stopper.requested = f"train.stop_at_step={tr.stop_at_step}"
        ckpt.save(step, params=params, opt_state=opt_state, data_state=data_iter.get_state(),
                  force=stopper.requested is not None)
        if stopper.requested:
            print(f"{stopper.requested}: saved checkpoint at step {step}; stopping "
                  f"(continue with --config.resume=True)", flush=True)
            metrics_file.close()
            ckpt.close()
            stopper.restore()
            return dict(stopped_at=step)
    ckpt.save(step, params=params, opt_state=opt_state, data_state=data_iter.get_state(),
              force=True)
    last = evaluate(eval_step, params, eval_batches, shard)
    log(dict(step=step, eval=last, final=True))
    print(f"final eval @ {step}: {json.dumps(last)}", flush=True)
    metrics_file.close()
    ckpt.close()
    stopper.restore()
    return last


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config=experiments/configs/<name>.py is required")
    logging.set_verbosity(logging.WARNING)
    try:
        train(config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
