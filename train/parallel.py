"""Data parallelism with `jax.jit` + `NamedSharding` over a device mesh, one code path from
one CPU to many hosts (the replacement for `pmap`, which is in maintenance mode).

Layout: a global batch is split into ``num_shards`` equally padded shards (the
`autoperi_jax.graph.BatchIterator` does this), stacked on a leading axis that is sharded
over the mesh's ``data`` axis. Each process feeds only its own shards
(`jax.make_array_from_process_local_data`). The loss is the mean over shards of a per-shard
loss computed with ``jax.vmap``; since every training shard holds the same number of real
graphs (the iterator drops incomplete batches), that is the mean over the global batch.
Parameters and optimiser state are replicated. The number of shards is a multiple of the
device count, so the same global batch gives the same numbers on 1 or N devices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from autoperi_jax.distributed import maybe_initialize_distributed

__all__ = [
    "DATA_AXIS",
    "create_state",
    "global_batch",
    "jit_train_step",
    "local_shards",
    "make_mesh",
    "maybe_initialize_distributed",  # re-exported from autoperi_jax.distributed, its home
    "replicated",
    "sharded",
    "sharded_loss",
]

DATA_AXIS = "data"


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh over every device of every process, axis name ``data``."""
    devices = devices if devices is not None else jax.devices()
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def sharded(mesh: Mesh) -> NamedSharding:
    """Leading axis split over ``data``."""
    return NamedSharding(mesh, P(DATA_AXIS))


def local_shards(mesh: Mesh, shards_per_device: int = 1) -> int:
    """Number of batch shards this process must produce."""
    return len(mesh.local_devices) * shards_per_device


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Assembles a global array from this process's stacked shards [local_shards, ...]."""
    sharding = sharded(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


def sharded_loss(
    loss_fn: Callable[[Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]],
) -> Callable[[Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]:
    """Turns ``loss_fn(params, shard, key) -> (loss, metrics)`` into the same function of a
    stacked batch [num_shards, ...]: shard s uses ``fold_in(key, s)``; loss and metrics are
    averaged over shards."""

    def fn(params, batch, key):
        n = jax.tree.leaves(batch)[0].shape[0]
        keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.arange(n))
        loss, metrics = jax.vmap(loss_fn, in_axes=(None, 0, 0))(params, batch, keys)
        return jnp.mean(loss), jax.tree.map(jnp.mean, metrics)

    return fn


def abstract_state(init_fn: Callable[..., Any], mesh: Mesh, *args: Any) -> Any:
    """The shapes, dtypes and (replicated) shardings of ``init_fn(*args)`` without computing
    it (`jax.eval_shape`): the restore target of a checkpoint."""
    rep = replicated(mesh)
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep),
        jax.eval_shape(init_fn, *args),
    )


def create_state(init_fn: Callable[..., Any], mesh: Mesh, *args: Any) -> Any:
    """Builds the train state ``init_fn(*args)`` directly on the mesh, replicated: its
    abstract shape comes from `jax.eval_shape` and ``init_fn`` is jitted with matching
    ``out_shardings`` (e.g. the optimiser state is created in place on every device)."""
    abstract = jax.eval_shape(init_fn, *args)
    shardings = jax.tree.map(lambda _: replicated(mesh), abstract)
    return jax.jit(init_fn, out_shardings=shardings)(*args)


def jit_train_step(train_step: Callable[[Any, Any, jax.Array], tuple[Any, Any]], mesh: Mesh):
    """``train_step(state, stacked_batch, key) -> (state, metrics)`` jitted over the mesh:
    state replicated and donated, batch sharded along its leading (shard) axis."""
    rep, shd = replicated(mesh), sharded(mesh)
    return jax.jit(
        train_step,
        in_shardings=(rep, shd, rep),
        out_shardings=(rep, rep),
        donate_argnums=(0,),
    )
