"""Orbax checkpoints: a pytree of arrays plus JSON metadata, never pickle.

A checkpoint step directory holds two Orbax items:

* ``state``: any pytree of arrays (parameters, optimiser state, EMA, step), written with
  ``StandardSave`` (tensorstore/OCDBT; restores onto the shardings of an abstract target);
* ``meta``: a JSON document (the config, normalisers, data-iterator position, metrics).

Nothing in a checkpoint can execute code when it is read. `Checkpointer` keeps the last
``max_to_keep`` steps plus the best one on a validation metric, saves asynchronously, and on
restore falls back to the previous step (with a warning) when the latest one is corrupt.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np

__all__ = ["Checkpointer", "load_pytree", "save_pytree", "to_jsonable"]


def to_jsonable(x: Any) -> Any:
    """Converts numpy / jax scalars and arrays inside dicts and lists to JSON types."""
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [to_jsonable(v) for v in x]
    if isinstance(x, np.ndarray | jax.Array):
        return np.asarray(x).tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


class Checkpointer:
    """Keeps the last N checkpoints and the best one; resumes from the newest readable one.

    Args:
      directory: checkpoint root (created if missing).
      max_to_keep: how many of the most recent steps to keep.
      best_metric: key of the ``metrics`` dict used to keep the best step (``None``: no best).
      best_mode: ``'min'`` or ``'max'``.
      async_save: write in a background thread (call `wait` before reading).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        max_to_keep: int = 3,
        best_metric: str | None = "val_loss",
        best_mode: str = "min",
        async_save: bool = True,
    ) -> None:
        import orbax.checkpoint as ocp
        from orbax.checkpoint import checkpoint_managers as cm

        self.directory = Path(directory).absolute()
        policies = [cm.LatestN(n=max_to_keep)]
        best_fn = None
        if best_metric is not None:

            def best_fn(m):
                return float(m[best_metric])

            sign = 1.0 if best_mode == "min" else -1.0
            policies.append(
                cm.BestN(
                    # BestN keeps the n largest after sorting; negate so the best ranks first.
                    get_metric_fn=lambda m: -sign * float(m[best_metric]),
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        self._ocp = ocp
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=cm.AnyPreservationPolicy(policies),
                enable_async_checkpointing=async_save,
                create=True,
                best_fn=best_fn,
                best_mode=best_mode,
            ),
            item_names=("state", "meta"),
        )

    def save(
        self,
        step: int,
        state: Any,
        meta: dict[str, Any],
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Saves ``state`` (pytree of arrays) and ``meta`` (JSON-able dict) at ``step``."""
        ocp = self._ocp
        self.manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave(to_jsonable(meta)),
            ),
            metrics=to_jsonable(metrics) if metrics is not None else None,
            force=True,
        )

    def wait(self) -> None:
        """Blocks until asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def restore(
        self,
        abstract_state: Any,
        step: int | None = None,
        delete_unreadable: bool = False,
    ) -> tuple[Any, dict[str, Any], int] | None:
        """Restores the newest readable checkpoint at or before ``step``.

        Args:
          abstract_state: pytree of `jax.ShapeDtypeStruct` (with shardings) or arrays that
            gives the structure, shapes, dtypes and placement to restore into; ``None``
            restores the saved structure onto this process's first device, whatever
            device layout wrote it (e.g. a model trained on 4 devices, read on a laptop).
          step: a specific step; ``None`` = the latest.
          delete_unreadable: delete the unreadable steps newer than the one restored (a
            resumed run will write those steps again).

        Returns:
          ``(state, meta, step)``, or ``None`` when there is no readable checkpoint.
        """
        ocp = self._ocp
        candidates = [s for s in self.steps() if step is None or s <= step]
        unreadable: list[int] = []
        for s in reversed(candidates):
            try:
                target = abstract_state
                if target is None:
                    target = single_device_target(self.directory / str(s) / "state")
                out = self.manager.restore(
                    s,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as e:  # corrupt or partial step: fall back to an older one
                warnings.warn(
                    f"checkpoint step {s} in {self.directory} is unreadable "
                    f"({type(e).__name__}: {str(e)[:200]}); trying an earlier one",
                    stacklevel=2,
                )
                unreadable.append(s)
                continue
            if delete_unreadable:
                for bad in unreadable:
                    self.manager.delete(bad)
            return out.state, dict(out.meta), s
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def single_device_target(item_dir: str | os.PathLike) -> Any:
    """Abstract pytree of a saved ``StandardSave`` item (shapes and dtypes from its
    metadata) placed on ``jax.local_devices()[0]``: restoring into it works whatever
    device layout wrote the item (without a target Orbax refuses a checkpoint written on
    another topology, e.g. 4 CPU devices read on one GPU)."""
    import orbax.checkpoint as ocp

    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    handler = ocp.StandardCheckpointHandler()
    try:
        tree = handler.metadata(Path(item_dir).absolute())
    finally:
        handler.close()
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)


def save_pytree(directory: str | os.PathLike, tree: Any, meta: dict[str, Any]) -> None:
    """Writes one pytree + JSON metadata (e.g. a model for inference) synchronously."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", tree, force=True)
    (directory / "meta.json").write_text(json.dumps(to_jsonable(meta), indent=2))


def load_pytree(directory: str | os.PathLike, target: Any | None = None) -> tuple[Any, dict]:
    """Reads what `save_pytree` wrote; ``target`` (optional) gives structure/shardings,
    else every array lands on this process's first device (`single_device_target`), so a
    bundle written with its arrays sharded over several devices loads on one."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    if not (directory / "meta.json").exists():
        raise FileNotFoundError(f"{directory}: no meta.json, not a saved model")
    meta = json.loads((directory / "meta.json").read_text())
    with ocp.StandardCheckpointer() as ckptr:
        if target is None:
            target = single_device_target(directory / "params")
        tree = ckptr.restore(directory / "params", target)
    return tree, meta
