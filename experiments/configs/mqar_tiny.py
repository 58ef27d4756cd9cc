"""Tiny MQAR experiment that trains on a CPU in a few minutes.

  python -m experiments.train --config=experiments/configs/mqar_tiny.py            # MoM
  python -m experiments.train --config=experiments/configs/mqar_tiny.py:gated_deltanet
"""
from experiments.configs import common
from mom_jax.data import pipeline


def get_config(mixer: str = "mom"):
    data = pipeline.default_mqar_config()
    data.vocab_size = 64
    data.num_kv_pairs = [2, 4]
    data.num_train_examples = 20000
    data.num_test_examples = 512
    model = common.model_config(
        mixer=mixer, vocab_size=64, hidden_size=64, num_layers=2, num_heads=2, head_dim=32,
        num_memories=4, topk=2, chunk_size=16, attn_num_heads=2, attn_head_dim=32,
        hidden_ratio=2.0, dtype="float32", impl="auto")
    train = common.train_config(batch_size=64, seq_len=32, steps=1000, warmup_steps=30, lr=5e-3,
                                weight_decay=0.1, log_every=100, eval_every=0, eval_batches=16,
                                checkpoint_every=200, aux_weight=0.01)
    return common.base_config(model=model, data=data, train=train,
                              workdir=f"runs/mqar_tiny_{mixer}")
