"""Data parallelism: 4 forced CPU devices give the same loss and parameters as 1 device on
the same global batch. Runs in a subprocess because XLA_FLAGS must be set before JAX starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    from autoperi_jax.graph import BatchIterator, make_buckets
    from autoperi_jax.loss import make_loss_fn
    from autoperi_jax.model import compute_normalisers, init_params
    from train import parallel
    from train.configs.test import get_config
    from train.trainer import (
        build_model, build_settings, load_split, make_optimizer, make_train_step,
    )

    assert len(jax.devices()) == 4, jax.devices()
    config = get_config()
    ds = load_split(config, "train", progress=False)
    model, settings = build_model(config), build_settings(config)
    normalisers = compute_normalisers(ds.graphs)
    shards = 4
    buckets = make_buckets(ds.n_node, ds.n_edge, config.batch_size // shards, 1, seed=0)
    it = BatchIterator(ds.graphs, config.batch_size, buckets=buckets, seed=0, local_shards=shards)
    _, schedule = make_optimizer(config)
    # Plain SGD: an update linear in the gradient. Adam divides each gradient by its own
    # running RMS, so a near-zero gradient whose float32 sum order differs across devices
    # can flip sign and move its parameter by a whole learning rate; the optimiser is
    # elementwise and identical on every device, so SGD tests the sharding exactly.
    tx = optax.sgd(1e-2)
    loss_fn = parallel.sharded_loss(make_loss_fn(model, settings, normalisers))

    def init(params):
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    def run(n_dev):
        # three steps from the same start on the same global batches over n_dev devices
        mesh = parallel.make_mesh(jax.devices()[:n_dev])
        it.restore({"epoch": 0, "step_in_epoch": 0})
        first = jax.tree.map(lambda x: x[0], next(it))
        it.restore({"epoch": 0, "step_in_epoch": 0})
        params = init_params(model, first, settings, jax.random.PRNGKey(0))
        state = parallel.create_state(init, mesh, params)
        step = parallel.jit_train_step(make_train_step(loss_fn, tx, schedule), mesh)
        losses = []
        for _ in range(3):
            batch = parallel.global_batch(next(it), mesh)
            assert len(batch.senders.sharding.device_set) == n_dev
            state, m = step(state, batch, jax.random.PRNGKey(1))
            losses.append(float(m["loss"]))
        leaves = jax.tree.leaves(jax.device_get(state["params"]))
        flat = np.concatenate([np.ravel(x) for x in leaves])
        np.save(f"{sys.argv[1]}/{n_dev}.npy", flat)
        return losses

    # one process for both meshes: XLA_FLAGS must be set before JAX starts, and the start,
    # imports and data loading are paid once
    print(json.dumps({n: run(n) for n in (1, 4)}))
    """
)


def test_four_devices_equal_one_device(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = json.loads(proc.stdout.strip().splitlines()[-1])
    one, four = losses["1"], losses["4"]
    np.testing.assert_allclose(four, one, rtol=2e-5)
    assert len(set(one)) == 3  # the loss moves: training happened
    p1, p4 = np.load(tmp_path / "1.npy"), np.load(tmp_path / "4.npy")
    np.testing.assert_allclose(p4, p1, rtol=1e-4, atol=1e-6)
