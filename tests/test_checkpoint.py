"""Orbax checkpoints: round trip, retention (last N + best), corruption fallback, no pickle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoperi_jax.checkpoint import Checkpointer, load_pytree, save_pytree


def _state(v: float):
    return {"params": {"w": jnp.full((3, 2), v), "b": jnp.arange(2.0) + v}, "step": jnp.int32(v)}


def test_round_trip_and_retention(tmp_path):
    ck = Checkpointer(tmp_path / "ck", max_to_keep=2, best_metric="val_loss")
    losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: 2.5}
    for step, loss in losses.items():
        ck.save(
            step,
            _state(step),
            {"config": {"lr": 1e-3}, "it": {"epoch": step}},
            metrics={"val_loss": loss},
        )
    ck.wait()
    assert ck.steps() == [2, 4, 5]  # last two + the best (step 2, lowest loss)
    assert ck.best_step() == 2
    abstract = jax.eval_shape(lambda: _state(0.0))
    state, meta, step = ck.restore(abstract)
    assert step == 5 and meta["it"] == {"epoch": 5}
    np.testing.assert_array_equal(state["params"]["w"], np.full((3, 2), 5.0))
    state, _, step = ck.restore(abstract, step=3)
    assert step == 2 and float(state["params"]["b"][0]) == 2.0
    ck.close()


def test_corrupt_latest_falls_back_with_warning(tmp_path):
    ck = Checkpointer(tmp_path / "ck", max_to_keep=3, best_metric=None, async_save=False)
    for step in (10, 20):
        ck.save(step, _state(step), {"step": step})
    ck.wait()
    latest = tmp_path / "ck" / "20" / "state"
    assert latest.exists()
    for f in latest.rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    with pytest.warns(UserWarning, match="step 20 .* unreadable"):
        state, meta, step = ck.restore(jax.eval_shape(lambda: _state(0.0)))
    assert step == 10 and meta == {"step": 10}
    np.testing.assert_array_equal(state["params"]["w"], np.full((3, 2), 10.0))


def test_empty_directory_restores_nothing(tmp_path):
    ck = Checkpointer(tmp_path / "none", best_metric=None)
    assert ck.restore(jax.eval_shape(lambda: _state(0.0))) is None


def test_save_and_load_model_without_pickle(tmp_path):
    tree = {"encoder": {"kernel": np.ones((4, 4), np.float32)}, "scale": np.float32(2.0)}
    save_pytree(tmp_path / "model", tree, {"config": {"latent": 8}, "norm": np.array([1.0, 2.0])})
    back, meta = load_pytree(tmp_path / "model")
    np.testing.assert_array_equal(back["encoder"]["kernel"], tree["encoder"]["kernel"])
    assert meta == {"config": {"latent": 8}, "norm": [1.0, 2.0]}
    for f in (tmp_path / "model").rglob("*"):
        if f.is_file():
            assert b"pickle" not in f.name.encode() and not f.read_bytes().startswith(b"\x80")
    with pytest.raises(FileNotFoundError, match="not a saved model"):
        load_pytree(tmp_path)


_SAVE_SHARDED_MODEL = """
import sys
import jax, jax.numpy as jnp, numpy as np
from autoperi_jax.checkpoint import save_pytree
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
tree = {"kernel": jax.device_put(jnp.arange(12.0).reshape(4, 3), sharded), "bias": jnp.ones(3)}
save_pytree(sys.argv[1], tree, {"config": {"latent": 8}})
"""


def test_load_model_written_on_another_device_layout(tmp_path):
    """A bundle whose arrays were saved sharded over 4 devices loads on this process's one
    device (Orbax alone refuses: "Topology mismatch")."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}  # fmt: skip
    out = tmp_path / "model"
    subprocess.run([sys.executable, "-c", _SAVE_SHARDED_MODEL, str(out)], env=env, check=True)
    back, meta = load_pytree(out)
    np.testing.assert_array_equal(np.asarray(back["kernel"]), np.arange(12.0).reshape(4, 3))
    assert len(back["kernel"].sharding.device_set) == 1 and meta == {"config": {"latent": 8}}
