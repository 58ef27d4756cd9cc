"""Orbax checkpoints of the whole training state: params, optimiser state, step and data position.

Layout: ``<workdir>/checkpoints/<step>/{state, data}``; ``state`` is an orbax PyTree (params,
opt_state, step), ``data`` the data iterator's JSON state.  Restoring takes abstract targets, so a
checkpoint can be restored onto any sharding / mesh the targets carry.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Periodic + forced saves with keep-last-n, and exact restore."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, save_interval_steps: int = 1000):
        if max_to_keep < 1:
            raise ValueError(f"checkpoint max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, save_interval_steps=max(1, save_interval_steps),
                create=True, enable_async_checkpointing=False))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, *, params, opt_state, data_state: dict, force: bool = False) -> bool:
        """Saves if ``step`` is on the save interval (or ``force``).  Returns whether it saved."""
        if self._manager.latest_step() == step:   # e.g. a periodic save just took this step
            return False
        state = dict(params=params, opt_state=opt_state, step=step)
        saved = self._manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=ocp.args.JsonSave(data_state)), force=force)
        self._manager.wait_until_finished()
        return bool(saved)

    def restore(self, step: int | None, *, params, opt_state):
        """Restores ``step`` (default: latest) onto the structure/sharding of the given targets.

        Returns (params, opt_state, step, data_state).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint found in {self.directory}")
        target = dict(params=params, opt_state=opt_state, step=0)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        out = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                          data=ocp.args.JsonRestore()))
        state = out["state"]
        return state["params"], state["opt_state"], int(state["step"]), out["data"]

    def close(self):
        self._manager.close()
