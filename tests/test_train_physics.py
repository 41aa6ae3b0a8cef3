"""The beta * L_phys term: `make_phys_fn` on decoded structures, and how `make_loss_fn` uses it
(not traced at all when beta_phys = 0; logged as l_phys and its parts otherwise)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoperi_jax.loss import make_loss_fn
from autoperi_jax.model import compute_normalisers, init_params
from autoperi_jax.testing import random_batch, tiny_model
from train.cli import load_config
from train.trainer import make_phys_fn

PEROVSKITE = np.array([[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])


def _config(**physics):
    c = load_config("train/configs/test.py")
    c.physics.update(physics)
    return c


def test_phys_fn_terms_reference_and_gradient():
    c = _config(mp_grid=(1, 1, 1))
    cells = np.stack([np.eye(3) * 3.9, np.eye(3) * 4.1, np.eye(3)])  # last: a padding graph
    phys = make_phys_fn(c, cells[:2])
    numbers = jnp.asarray([[38, 22, 8, 8, 8], [20, 22, 8, 8, 8], [0, 0, 0, 0, 0]])
    mask = numbers > 0
    ref = jnp.asarray(np.broadcast_to(PEROVSKITE, (3, 5, 3)), jnp.float32)
    shifted = ref.at[:, 2, 0].add(0.08)  # one O atom off its site

    cells = jnp.asarray(cells, jnp.float32)

    @jax.jit
    def run(frac):
        def total(f):
            out = phys(cells, f, numbers, mask, ref)
            return jnp.sum(out["total"]), out

        (_, moved), grad = jax.value_and_grad(total, has_aux=True)(frac)
        return phys(cells, ref, numbers, mask, ref), moved, grad

    same, moved, g = run(shifted)
    assert set(same) == {"total", "energy", "stability", "chem"}
    assert all(v.shape == (3,) for v in same.values())
    np.testing.assert_allclose(same["energy"], 0.0, atol=1e-5)  # relative to the reference
    assert np.all(np.asarray(moved["total"][:2]) != np.asarray(same["total"][:2]))
    assert float(moved["total"][2]) == 0.0  # an empty (padding) graph costs nothing
    assert np.all(np.isfinite(g)) and np.any(np.asarray(g[:2]) != 0)
    assert np.all(np.asarray(g[2]) == 0)


def test_zero_weight_skips_a_term():
    c = _config(weights=(1.0, 0.0, 0.0))
    phys = make_phys_fn(c, np.eye(3)[None] * 4.0)
    jaxpr = str(jax.make_jaxpr(phys)(
        jnp.eye(3)[None] * 4.0, jnp.asarray(PEROVSKITE[None], jnp.float32),
        jnp.asarray([[38, 22, 8, 8, 8]]), jnp.ones((1, 5), bool),
        jnp.asarray(PEROVSKITE[None], jnp.float32),
    ))  # fmt: skip
    assert "eigh" not in jaxpr  # no phonon eigenproblem when w_stability = 0


def test_loss_uses_phys_only_when_beta_positive():
    model, settings = tiny_model()
    batch, graphs = random_batch(np.random.default_rng(3), 2, model.enc_cutoff, n_atoms=(2, 3))
    batch = jax.tree.map(jnp.asarray, batch)
    # Shapes only (tracing, no compilation): the test is about what the loss computes.
    params = jax.eval_shape(lambda k: init_params(model, batch, settings, k), jax.random.key(0))
    normalisers = compute_normalisers(graphs)
    calls = []

    def phys_fn(cell, frac, numbers, mask, ref_frac):
        calls.append(frac.shape)
        e = jnp.sum(jnp.sin(frac) ** 2 * mask[..., None], axis=(1, 2))
        return {"total": 2.0 * e, "energy": e}

    key = jax.random.PRNGKey(0)
    off = make_loss_fn(model, settings, normalisers, phys_fn)
    _, metrics = jax.eval_shape(off, params, batch, key)
    assert not calls and not any(k.startswith("l_phys") for k in metrics)

    on = dataclasses.replace(settings, beta_phys=0.5)
    loss_fn = make_loss_fn(model, on, normalisers, phys_fn)
    _, metrics = jax.eval_shape(loss_fn, params, batch, key)
    assert calls == [(batch.n_node.shape[0], settings.max_atoms, 3)]
    assert {"l_phys", "l_phys_energy"} <= set(metrics)

    with pytest.raises(ValueError, match="phys_fn"):
        make_loss_fn(model, on, normalisers, None)
    with pytest.raises(ValueError, match="learned"):
        make_loss_fn(model, dataclasses.replace(on, flow_prior="uniform"), normalisers, phys_fn)


@pytest.mark.slow
def test_training_with_beta_phys_logs_finite_terms(tmp_path):
    """A few steps of the test config with beta_phys > 0: l_phys and its three parts are
    logged, finite, and no step is skipped."""
    import json

    import pandas as pd

    from autoperi_jax.datasets import resolve_dataset
    from train.trainer import train_and_evaluate

    (tmp_path / "data" / "perov_5").mkdir(parents=True)
    for split in ("train", "val"):
        frame = pd.read_csv(resolve_dataset(f"perov_5:{split}"), nrows=16)
        frame.to_csv(tmp_path / "data" / "perov_5" / f"{split}.csv", index=False)
    c = _config(mp_grid=(1, 1, 1))
    c.data.data_dir = str(tmp_path / "data")
    c.data.limit_train = 16
    c.batch_size = 8
    c.objective.beta_phys = 0.1
    c.num_train_steps = 4
    c.log_every = 2
    c.eval_every = 0
    c.checkpoint_every = 4
    result = train_and_evaluate(c, tmp_path / "run")
    records = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    train = [r for r in records if r["split"] == "train"]
    assert records[0]["beta_phys"] == 0.1 and len(train) == 2
    for r in train:
        for k in ("l_phys", "l_phys_energy", "l_phys_stability", "l_phys_chem"):
            assert np.isfinite(r[k]), (k, r[k])
        assert r["skipped"] == 0
    assert result["summary"]["nonfinite_total"] == 0
