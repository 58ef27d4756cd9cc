"""The paper's 1.3B-class models: D=2048, MLP ratio 4 (see lm_340m.py for the variants)."""
from experiments.configs import lm_340m


def get_config(variant: str = "mom"):
    config = lm_340m.get_config(variant)
    with config.unlocked():
        config.model.hidden_size = 2048
        config.model.hidden_ratio = 4.0
        config.model.attn_num_heads = 32
        config.workdir = f"runs/lm_1p3b_{variant}"
    return config
