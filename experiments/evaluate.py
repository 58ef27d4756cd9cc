"""Evaluate a training run's checkpoint with jit-compiled evaluation.

  python -m experiments.evaluate --workdir=runs/mqar_tiny_mom [--step=N] [--eval_batches=16]

Reports perplexity and accuracy; MQAR accuracy by number of key-value pairs; on text also the
associative-recall-hit perplexity: the loss on tokens that complete a bigram already seen earlier in
the same context (the tokens an in-context recall memory should get right).
"""
from __future__ import annotations

import json
import os
import sys

import jax
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments.train import ConfigError, validate
from mom_jax.data import pipeline
from mom_jax.models import LanguageModel
from mom_jax.training import checkpoint, optim, steps
from mom_jax.training.evaluation import evaluate

flags.DEFINE_string("workdir", None, "the training run's workdir (holds config.json, checkpoints/)")
flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
flags.DEFINE_integer("eval_batches", None, "number of evaluation batches (default: the config's)")
F = flags.FLAGS


def run(workdir: str, step: int | None = None, eval_batches: int | None = None) -> dict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    model_cfg = validate(config)
    tr = config.train
    model_fn, params = steps.ModelFn.from_module(LanguageModel(model_cfg, rngs=nnx.Rngs(0)))
    tx, _ = optim.make_optimizer(peak_lr=tr.lr, warmup_steps=tr.warmup_steps,
                                 total_steps=tr.steps, min_lr_ratio=tr.min_lr_ratio, b1=tr.b1,
                                 b2=tr.b2, weight_decay=tr.weight_decay, clip_norm=tr.clip_norm)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    params, _, at_step, _ = ckpt.restore(step, params=params, opt_state=tx.init(params))
    eval_step = jax.jit(steps.make_eval_step(model_fn, topk=model_cfg.topk))
    batches = pipeline.make_eval_batches(config.data, batch_size=tr.batch_size,
                                         seq_len=tr.seq_len, seed=tr.seed,
                                         num_batches=eval_batches or tr.eval_batches)
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P("data"))

    def shard(batch):
        return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
                for k, v in batch.items() if k != "num_kv_pairs"}

    res = evaluate(eval_step, params, batches, shard, recall_hit=config.data.name == "text")
    res["step"] = at_step
    return res


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not F.workdir:
        raise app.UsageError("--workdir is required")
    try:
        res = run(F.workdir, F.step, F.eval_batches)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"checkpoint step {res['step']}: {res['tokens']:,} scored tokens")
    print(f"  loss {res['loss']:.4f}  perplexity {res['ppl']:.2f}  accuracy {res['accuracy']:.4f}")
    if "recall_hit_ppl" in res:
        print(f"  associative-recall-hit perplexity {res['recall_hit_ppl']:.2f} "
              f"({res['recall_hit_tokens']:,} tokens)")
    if "accuracy_by_kv_pairs" in res:
        print("  MQAR accuracy by key-value pairs:")
        for k, v in res["accuracy_by_kv_pairs"].items():
            print(f"    {k:>4} pairs: {v:.4f}")
    with open(os.path.join(F.workdir, f"eval_step{res['step']}.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    app.run(main)
