"""Per-module learning rates (`train.loop.scale_by_path`, ``config.lr_scales``)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from train.loop import OptimizerSettings, optimizer


def _settings(**kw) -> OptimizerSettings:
    base = dict(
        learning_rate=1e-2, num_steps=10, warmup_steps=0, final_lr_fraction=1.0,
        weight_decay=0.0, grad_clip=1e9,
    )  # fmt: skip
    base.update(kw)
    return OptimizerSettings(**base)


def test_matched_parameters_step_factor_times_further():
    """Three Adam steps on the same gradients: a parameter whose path matches moves
    exactly ``factor`` times as far as without the scale (Adam's update does not depend
    on the scale, so the ratio is exact); the others move the same."""
    params = {"encoder": {"z_comp_0": jnp.ones(3), "z_lattice_0": jnp.ones(3)}, "head": jnp.ones(2)}
    grads = jax.tree.map(lambda p: jnp.linspace(-1.0, 2.0, p.size), params)
    plain, _ = optimizer(_settings())
    scaled, _ = optimizer(_settings(lr_scales=(("z_comp_", 10.0), ("head", 0.5))))

    def run(tx):
        state, p = tx.init(params), params
        for _ in range(3):
            upd, state = tx.update(grads, state, p)
            p = optax.apply_updates(p, upd)
        return jax.tree.map(lambda a, b: np.asarray(a - b), p, params)

    a, b = run(plain), run(scaled)
    np.testing.assert_allclose(b["encoder"]["z_comp_0"], 10 * a["encoder"]["z_comp_0"], rtol=1e-5)
    np.testing.assert_allclose(b["head"], 0.5 * a["head"], rtol=1e-5)
    np.testing.assert_array_equal(b["encoder"]["z_lattice_0"], a["encoder"]["z_lattice_0"])
    assert np.abs(a["encoder"]["z_comp_0"]).min() > 0


def test_from_config_reads_lr_scales():
    c = ml_collections.ConfigDict(
        dict(learning_rate=1e-3, num_train_steps=5, warmup_steps=1, final_lr_fraction=0.1,
             weight_decay=0.0, grad_clip=1.0, lr_scales=(("z_comp_", 10),))
    )  # fmt: skip
    assert OptimizerSettings.from_config(c).lr_scales == (("z_comp_", 10.0),)
    del c["lr_scales"]
    assert OptimizerSettings.from_config(c).lr_scales == ()
