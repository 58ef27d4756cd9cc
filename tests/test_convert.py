"""Import of flash-linear-attention MomAttention weights (fla names, torch layouts)."""
import jax
import numpy as np
import pytest
from flax import nnx

from mom_jax import convert
from mom_jax.layers import MoMLayer


def fla_state_dict(layer):
    """Written independently of mom_jax.convert: our [in, out] params -> fla names / layouts."""
    p = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
    t = lambda a: np.asarray(a).T  # noqa: E731
    sd = {"q_proj.weight": t(p["q_proj"]), "gate.weight": t(p["gate"]),
          "A_log": np.asarray(p["A_log"]), "dt_bias": np.asarray(p["dt_bias"]),
          "o_norm.weight": np.asarray(p["head"]["o_norm"]), "o_proj.weight": t(p["head"]["o_proj"])}
    if "g_proj" in p["head"]:
        sd["g_proj.weight"] = t(p["head"]["g_proj"])
    for part in "kvba":
        if f"{part}_proj" in p:
            for m in range(p[f"{part}_proj"].shape[0]):
                sd[f"{part}_proj.{m}.weight"] = t(p[f"{part}_proj"][m])
        if f"shared_{part}" in p:
            sd[f"shared_{part}.weight"] = t(p[f"shared_{part}"])
    for part in "qkv":
        if f"{part}_conv" in p:
            sd[f"{part}_conv1d.weight"] = t(p[f"{part}_conv"])[:, None, :]   # [C, 1, W]
    return sd


@pytest.mark.parametrize("kw", [
    dict(), dict(shared_memory=False), dict(use_output_gate=False), dict(num_memories=5, topk=3),
    dict(expand_v=2.0), dict(conv_size=3),
])
def test_import_round_trip(kw):
    layer = MoMLayer(24, num_heads=3, head_dim=4, chunk_size=8, rngs=nnx.Rngs(0), **kw)
    sd = fla_state_dict(layer)
    imported = convert.mom_layer_from_torch_state_dict(sd, topk=layer.topk, chunk_size=8)
    assert (imported.num_memories, imported.num_heads, imported.head_dim, imported.head_v_dim,
            imported.shared_memory, imported.conv_size) == (
        layer.num_memories, layer.num_heads, layer.head_dim, layer.head_v_dim,
        layer.shared_memory, layer.conv_size)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 19, 24))
    y0, l0 = layer(x)
    y1, l1 = imported(x)
    np.testing.assert_array_equal(y0, y1)
    np.testing.assert_array_equal(l0, l1)
    # and the export is the exact inverse
    back = convert.mom_layer_to_torch_state_dict(imported)
    assert back.keys() == sd.keys()
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def test_single_kv_proj_import_needs_shared_flag():
    layer = MoMLayer(16, num_heads=2, head_dim=4, single_kv_proj=True, shared_memory=True,
                     chunk_size=8, rngs=nnx.Rngs(0))
    sd = fla_state_dict(layer)
    with pytest.raises(ValueError, match="pass shared_memory"):
        convert.mom_layer_from_torch_state_dict(sd, topk=2)
    imported = convert.mom_layer_from_torch_state_dict(sd, topk=2, shared_memory=True, chunk_size=8)
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 9, 16))
    np.testing.assert_array_equal(layer(x)[0], imported(x)[0])


def test_import_rejects_unknown_and_mismatched_entries():
    layer = MoMLayer(16, num_heads=2, head_dim=4, chunk_size=8, rngs=nnx.Rngs(0))
    sd = fla_state_dict(layer)
    with pytest.raises(ValueError, match="does not use"):
        convert.mom_layer_from_torch_state_dict({**sd, "extra.weight": np.ones(3)}, topk=2)
    bad = dict(sd)
    bad["o_proj.weight"] = np.ones((16, 7), np.float32)
    with pytest.raises(ValueError, match="o_proj.weight: expected shape"):
        convert.mom_layer_from_torch_state_dict(bad, topk=2)
    missing = {k: v for k, v in sd.items() if k != "A_log"}
    with pytest.raises(KeyError, match="A_log"):
        convert.mom_layer_from_torch_state_dict(missing, topk=2)
