"""The paper's 340M-class language models on text (Mistral SentencePiece tokenizer, context 2048).

  --config=experiments/configs/lm_340m.py             MoM, E=4, top-2, shared memory
  --config=experiments/configs/lm_340m.py:gated_deltanet
  --config=experiments/configs/lm_340m.py:transformer Transformer++ (16 heads x 64, RoPE)
  --config=experiments/configs/lm_340m.py:hybrid      MoM with one attention layer every 6
"""
VARIANTS = {
    "mom": dict(mixer="mom"),
    "gated_deltanet": dict(mixer="gated_deltanet"),
    "gla": dict(mixer="gla"),
    "transformer": dict(mixer="attention"),
    "hybrid": dict(mixer="mom", attention_every=6),
}


def model_kwargs(variant: str = "mom") -> dict:
    """ModelConfig fields of a variant (importable without the data / config libraries)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    return dict(vocab_size=32000, hidden_size=1024, num_layers=24, num_heads=4, head_dim=256,
                num_memories=4, topk=2, shared_memory=True, hidden_ratio=3.0, attn_num_heads=16,
                attn_head_dim=64, tie_embeddings=True, dtype="bfloat16", **VARIANTS[variant])


def get_config(variant: str = "mom"):
    from experiments.configs import common
    from mom_jax.data import pipeline

    data = pipeline.default_text_config()
    data.tokenizer = "mistral"
    model = common.model_config(**model_kwargs(variant))
    train = common.train_config(batch_size=8, seq_len=2048, steps=20000, warmup_steps=1000,
                                lr=3e-4, b1=0.9, b2=0.95, weight_decay=0.01, clip_norm=1.0,
                                aux_weight=0.01, log_every=20, eval_every=1000,
                                checkpoint_every=1000)
    return common.base_config(model=model, data=data, train=train, workdir=f"runs/lm_340m_{variant}")
