"""Main job: train tiny MoM and Gated DeltaNet models on MQAR and print their accuracy table.

  python -m experiments.mqar_compare [--mixers=mom,gated_deltanet] [--steps=600] [--root=runs]

Each model is trained by experiments.train (config experiments/configs/mqar_tiny.py) in its own
workdir under --root (checkpoints, metrics.jsonl); re-running with --resume continues them.
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags

from experiments import train as train_lib
from experiments.configs import mqar_tiny

flags.DEFINE_list("mixers", ["mom", "gated_deltanet"], "mixers to compare")
flags.DEFINE_integer("steps", None, "training steps per model (default: the config's)")
flags.DEFINE_string("root", "runs", "parent folder of the runs' workdirs")
flags.DEFINE_bool("resume", False, "continue runs from their latest checkpoints")
flags.DEFINE_integer("seed", 0, "seed (model init and data order)")
F = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    results = {}
    for mixer in F.mixers:
        try:
            config = mqar_tiny.get_config(mixer)
        except ValueError as e:
            raise app.UsageError(str(e))
        config.workdir = os.path.join(F.root, f"mqar_tiny_{mixer}")
        config.resume = F.resume
        config.train.seed = F.seed
        if F.steps:
            config.train.steps = F.steps
            config.train.warmup_steps = min(config.train.warmup_steps, F.steps // 10)
        print(f"\n=== {mixer} ({config.workdir}) ===", flush=True)
        t0 = time.perf_counter()
        res = train_lib.train(config)
        if "stopped_at" in res:
            print(f"{mixer}: stopped at step {res['stopped_at']}; rerun with --resume")
            return
        res["minutes"] = (time.perf_counter() - t0) / 60
        results[mixer] = res
    kv = sorted({k for r in results.values() for k in r.get("accuracy_by_kv_pairs", {})})
    print("\nMQAR accuracy on held-out examples (query positions)")
    header = "| model | " + " | ".join(f"{k} kv pairs" for k in kv) + " | all | minutes |"
    print(header)
    print("|" + "---|" * (len(kv) + 3))
    for mixer, r in results.items():
        cells = [f"{r['accuracy_by_kv_pairs'].get(k, float('nan')):.3f}" for k in kv]
        print(f"| {mixer} | " + " | ".join(cells) + f" | {r['accuracy']:.3f} | {r['minutes']:.1f} |")
    with open(os.path.join(F.root, "mqar_compare.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)
