"""Losses and decoding: masking, padding independence, finite gradients, valid output."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoperi_jax.crystal import cell_to_lattice_params
from autoperi_jax.graph import PaddingBudget, batch_graphs
from autoperi_jax.loss import (
    composition_loss,
    connectivity_loss,
    coordinate_loss,
    latent_sample,
    lattice_loss,
    make_loss_fn,
)
from autoperi_jax.model import (
    compute_normalisers,
    decoded_to_crystals,
    dense_layout,
    init_params,
    make_reconstruct_fn,
)
from autoperi_jax.nn import Autoencoder
from autoperi_jax.testing import random_graph, tiny_model, tiny_params
from autoperi_jax.torus import sort_by_species


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(3)
    graphs = [random_graph(rng, 5.0, n_atoms=(2, 5)) for _ in range(3)]
    model, settings = tiny_model()
    norm = compute_normalisers(graphs)
    batch = jax.tree.map(jnp.asarray, batch_graphs(graphs, PaddingBudget(24, 600, 4)))
    params = tiny_params(model, settings)
    loss_fn = make_loss_fn(model, settings, norm)
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    return model, settings, norm, graphs, batch, params, loss_fn, grad_fn


def test_loss_terms_finite_and_gradients_finite_with_padding(setup):
    model, settings, norm, graphs, batch, params, loss_fn, grad_fn = setup
    (loss, metrics), grads = grad_fn(params, batch, jax.random.PRNGKey(1))
    for k in ("l_lattice", "l_atom", "l_coord", "l_connect"):
        assert np.isfinite(float(metrics[k])) and float(metrics[k]) > 0, k
    assert np.isfinite(float(loss))
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0


def test_loss_does_not_depend_on_padding(setup):
    model, settings, norm, graphs, batch, params, loss_fn, grad_fn = setup
    key = jax.random.PRNGKey(2)
    bigger = jax.tree.map(jnp.asarray, batch_graphs(graphs, PaddingBudget(40, 900, 7)))
    a = jax.jit(loss_fn)(params, batch, key)
    b = jax.jit(loss_fn)(params, bigger, key)
    np.testing.assert_allclose(float(a[0]), float(b[0]), rtol=1e-5)
    for k in ("l_lattice", "l_atom", "l_coord", "l_connect"):
        np.testing.assert_allclose(float(a[1][k]), float(b[1][k]), rtol=1e-5, atol=1e-7)


def test_reconstruct_gives_valid_crystals(setup):
    model, settings, norm, graphs, batch, params, loss_fn, grad_fn = setup
    out = jax.jit(make_reconstruct_fn(model, settings, norm))(params, batch, jax.random.PRNGKey(4))
    crystals = decoded_to_crystals(out, batch.globals["mask"], ["a", "b", "c"])
    assert [c.name for c in crystals] == ["a", "b", "c"]
    for c in crystals:
        assert 1 <= c.num_atoms <= settings.max_atoms
        assert c.volume > 0
        assert np.all((c.frac_coords >= 0) & (c.frac_coords < 1))
        assert np.all((c.numbers >= 1) & (c.numbers <= 118))
    # bonds refer to decoded atoms of their crystal
    bm = np.asarray(out["bond_mask"])
    g = np.asarray(out["bond_graph"])[bm]
    n = np.asarray(out["n_atoms"])[g]
    assert np.all(np.asarray(out["bond_senders"])[bm] < n)
    assert np.all(np.asarray(out["bond_receivers"])[bm] < n)


def test_teacher_forced_decoding_uses_the_truth(setup):
    model, settings, norm, graphs, batch, params, loss_fn, grad_fn = setup
    fn = make_reconstruct_fn(model, settings, norm, teacher_lattice=True, teacher_composition=True)
    out = jax.jit(fn)(params, batch, jax.random.PRNGKey(4))
    crystals = decoded_to_crystals(out, batch.globals["mask"])
    for c, g in zip(crystals, graphs):
        np.testing.assert_array_equal(c.numbers, np.sort(g.numbers))
        np.testing.assert_allclose(c.lattice_params, cell_to_lattice_params(g.cell), rtol=1e-4)


@pytest.mark.slow  # 30-60 s: the default run stays under 15 min on 2 cores
def test_alternative_options_run():
    """Uniform prior, velocity target, self-conditioning, global context, Gaussian
    posterior: one model exercising every non-default path."""
    import dataclasses

    rng = np.random.default_rng(9)
    graphs = [random_graph(rng, 5.0, n_atoms=(2, 5)) for _ in range(2)]
    model, settings = tiny_model(
        self_condition=True, dec_global_context=True, posterior="gaussian", dec_layers=1
    )
    settings = dataclasses.replace(settings, flow_prior="uniform", flow_target="velocity")
    norm = compute_normalisers(graphs)
    batch = jax.tree.map(jnp.asarray, batch_graphs(graphs, PaddingBudget(16, 400, 3)))
    params = jax.jit(lambda k, b: init_params(model, b, settings, k))(jax.random.PRNGKey(0), batch)
    loss_fn = make_loss_fn(model, settings, norm)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        params, batch, jax.random.PRNGKey(1)
    )
    assert np.isfinite(float(loss)) and float(metrics["kl"]) > 0
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    out = jax.jit(make_reconstruct_fn(model, settings, norm))(params, batch, jax.random.PRNGKey(2))
    assert len(decoded_to_crystals(out, batch.globals["mask"])) == 2


def test_named_terms_called_alone_sum_to_the_loss(setup):
    """Each named term is a usable function on its own, and `make_loss_fn` is their
    weighted sum (with the deterministic posterior's z-regulariser)."""
    model, settings, norm, graphs, batch, params, loss_fn, grad_fn = setup
    key = jax.random.PRNGKey(6)
    loss, metrics = jax.jit(loss_fn)(params, batch, key)

    @jax.jit
    def terms(params, batch):
        k_post, k_t, k_x0, k_sc = jax.random.split(key, 4)
        gmask = batch.globals["mask"]
        gm = gmask.astype(jnp.float32)
        enc = model.apply(params, batch, method=Autoencoder.encode)
        z, reg, _ = latent_sample(model, enc, settings, k_post, gm)
        n = {k: jnp.asarray(v) for k, v in norm.items()}
        dense = dense_layout(batch, settings.max_atoms)
        sorted_dense = sort_by_species(dense)
        return (
            lattice_loss(model, params, z, batch.globals["lattice"], gm, n)[0],
            composition_loss(model, params, z, dense, gmask)[0],
            coordinate_loss(model, params, z, sorted_dense, gm, settings, (k_t, k_x0, k_sc))[0],
            connectivity_loss(model, params, z, sorted_dense, settings)[0],
            reg,
        )

    parts = [float(x) for x in terms(params, batch)]
    names = ("l_lattice", "l_atom", "l_coord", "l_connect")
    for name, value in zip(names, parts):
        np.testing.assert_allclose(value, float(metrics[name]), rtol=1e-6, err_msg=name)
    weights = (
        settings.lambda_lattice,
        settings.lambda_atom,
        settings.lambda_coord,
        settings.lambda_connect,
        1.0,
    )
    np.testing.assert_allclose(float(loss), sum(w * p for w, p in zip(weights, parts)), rtol=1e-6)


def test_guess_stop_gradient_keeps_the_guess_loss_out_of_the_encoder(setup):
    """With ``guess_stop_gradient`` the guess loss (``l_guess``, differentiated alone)
    trains the coordinate guess and leaves the encoder untouched; without it both move."""
    model, settings, norm, graphs, batch, params, loss_fn, grad_fn = setup

    def guess_only(params, batch, key, stop):
        s = dataclasses.replace(settings, guess_stop_gradient=stop)
        return make_loss_fn(model, s, norm)(params, batch, key)[1]["l_guess"]

    def norm_of(tree):
        return float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree))))

    grad = jax.jit(jax.grad(guess_only), static_argnums=3)
    for stop in (False, True):
        g = grad(params, batch, jax.random.PRNGKey(1), stop)["params"]
        assert norm_of(g["coordinate_guess"]) > 0, stop
        assert (norm_of(g["encoder"]) == 0.0) == stop, stop
