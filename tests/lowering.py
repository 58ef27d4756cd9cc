"""Lowering kernels for hardware this machine does not have (GPU: Triton IR; TPU: Mosaic)."""
from __future__ import annotations

import jax

H100 = "NVIDIA H100 80GB HBM3"


def abstract_mesh(kind: str = H100, platform: str = "gpu") -> jax.sharding.AbstractMesh:
    """A one-device abstract mesh of ``kind`` (``jax.sharding.use_abstract_mesh`` it around
    ``.lower(lowering_platforms=...)`` so that Pallas sees the target device)."""
    from jax._src import mesh as mesh_lib  # noqa: PLC0415
    dev = mesh_lib.AbstractDevice(device_kind=kind, num_cores=None, platform=platform)
    return jax.sharding.AbstractMesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                                     abstract_device=dev)
