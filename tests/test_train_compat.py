"""`load_checkpoint` reads runs written before the sharded trainer (format 1:
``Composite(state=StandardSave, config / normalisers / data = JsonSave)``), e.g. the shipped
Perov-5 run runs/p5_c, and every config builds its model and loss settings."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from autoperi_jax.checkpoint import load_checkpoint
from train.cli import load_config
from train.trainer import build_model, build_settings

ROOT = Path(__file__).resolve().parents[1]


def _save_format_1(workdir: Path, step: int, state, config, normalisers, data) -> None:
    """The writer of format 1, as train/trainer.py had it (``_manager`` + ``_save``)."""
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
        item_names=("state", "config", "normalisers", "data"),
    )
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(config.to_dict()),
            normalisers=ocp.args.JsonSave(normalisers),
            data=ocp.args.JsonSave(data),
        ),
        force=True,
    )
    mngr.wait_until_finished()
    mngr.close()


def test_reads_format_1(tmp_path):
    config = ml_collections.ConfigDict({"seed": 0, "model": {"max_atoms": 5}})
    params = {"dense": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.ones(3)}}
    state = {"params": params, "opt_state": optax.adam(1e-3).init(params), "step": jnp.int32(7)}
    norm = {"lattice_mean": [1.0] * 6, "lattice_std": [0.5] * 6}
    _save_format_1(tmp_path, 7, state, config, norm, {"epoch": 2, "step_in_epoch": 1})
    ck = load_checkpoint(tmp_path)
    assert ck["format"] == 1 and ck["step"] == 7
    assert isinstance(ck["config"], ml_collections.ConfigDict)
    assert ck["config"].model.max_atoms == 5
    assert ck["normalisers"] == norm and ck["data"] == {"epoch": 2, "step_in_epoch": 1}
    np.testing.assert_array_equal(ck["params"]["dense"]["kernel"], params["dense"]["kernel"])
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nothing")


_SAVE_SHARDED = """
import sys
from pathlib import Path
import jax, jax.numpy as jnp, ml_collections, numpy as np
sys.path.insert(0, "tests")
from test_train_compat import _save_format_1
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
kernel = jax.device_put(jnp.arange(12.0).reshape(4, 3), sharded)
state = {"params": {"dense": {"kernel": kernel, "bias": jnp.ones(3)}}, "step": jnp.int32(3)}
config = ml_collections.ConfigDict({"seed": 0})
norm = {"lattice_mean": [1.0] * 6, "lattice_std": [0.5] * 6}
_save_format_1(Path(sys.argv[1]), 3, state, config, norm, {"epoch": 0})
"""


def test_reads_format_1_written_on_another_device_layout(tmp_path):
    """A format-1 run saved with its parameters sharded over 4 devices is read on this
    process's one device (Orbax alone refuses: "Topology mismatch"; e.g. a run trained on
    CPU read by `autoperi train-flow` on a GPU)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}  # fmt: skip
    subprocess.run(
        [sys.executable, "-c", _SAVE_SHARDED, str(tmp_path)], cwd=ROOT, env=env, check=True
    )
    ck = load_checkpoint(tmp_path)
    assert ck["format"] == 1 and ck["step"] == 3
    kernel = ck["params"]["dense"]["kernel"]
    np.testing.assert_array_equal(np.asarray(kernel), np.arange(12.0).reshape(4, 3))
    assert len(kernel.sharding.device_set) == 1


@pytest.mark.skipif(not (ROOT / "runs" / "p5_c" / "checkpoints").is_dir(), reason="no p5_c run")
def test_reads_the_shipped_perov5_run():
    ck = load_checkpoint(ROOT / "runs" / "p5_c")
    assert ck["format"] == 1 and ck["step"] == 6000
    config = ck["config"]
    model, settings = build_model(config), build_settings(config)
    assert model.max_atoms == settings.max_atoms == 5 and settings.beta_phys == 0.0
    leaves = jax.tree.leaves(ck["params"])
    assert sum(int(np.prod(x.shape)) for x in leaves) > 10_000
    assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
    assert len(ck["normalisers"]["lattice_mean"]) == 6


@pytest.mark.parametrize(
    "name",
    ["perov_5", "perov_5_tune1", "perov_5_tune2", "carbon_24", "mp_20", "mpts_52", "test"],
)
def test_configs_build(name):
    c = load_config(f"train/configs/{name}.py")
    model, settings = build_model(c), build_settings(c)
    assert model.max_atoms == settings.max_atoms == c.model.max_atoms
    assert settings.beta_phys == c.objective.beta_phys == 0.0
    assert c.batch_size % max(c.num_shards, 1) == 0
    assert {"ema_decay", "max_nonfinite_steps", "keep_checkpoints", "optimizer"} <= set(c)
    assert c.model.max_atoms == {"carbon_24": 24, "mp_20": 20, "mpts_52": 52}.get(name, 5)


def test_fine_tuning_configs_chain_onto_perov_5():
    """The shipped autoencoder's stages: perov_5 -> tune1 -> tune2, same model config."""
    base = load_config("train/configs/perov_5.py")
    one = load_config("train/configs/perov_5_tune1.py")
    two = load_config("train/configs/perov_5_tune2.py")
    assert base.init_from is None
    assert (one.init_from, two.init_from) == ("runs/p5_c", "runs/p5_d")
    assert one.model.to_dict() == two.model.to_dict() == base.model.to_dict()
