"""The element-fraction composition head: rounding against an independent NumPy
implementation and exact cases, its loss against a hand-computed cross-entropy, and the
whole autoencoder decoding the composition it was given."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from autoperi_jax.crystal import Crystal
from autoperi_jax.graph import GraphSettings, PaddingBudget, batch_graphs, crystal_to_graph
from autoperi_jax.loss import composition_loss, make_loss_fn
from autoperi_jax.model import (
    compute_normalisers,
    counts_from_fractions,
    decode_composition,
    dense_layout,
    make_encode_fn,
)
from autoperi_jax.nn import Autoencoder
from autoperi_jax.testing import random_crystal, random_graph, tiny_model, tiny_params


def _largest_remainder(p: np.ndarray, n: int) -> np.ndarray:
    """Hamilton's method, written out with Python loops (the independent truth)."""
    expected = [n * float(x) for x in p]
    counts = [int(np.floor(e)) for e in expected]
    order = sorted(range(len(p)), key=lambda e: -(expected[e] - counts[e]))
    for e in order[: n - sum(counts)]:
        counts[e] += 1
    return np.array(counts)


def _to_sorted_list(counts: np.ndarray, slots: int) -> np.ndarray:
    out = np.zeros(slots, np.int64)
    atoms = np.repeat(np.arange(len(counts)), counts)
    out[: len(atoms)] = atoms
    return out


def test_counts_equal_largest_remainder_on_random_logits():
    rng = np.random.default_rng(0)
    G, A = 64, 20
    logits = rng.normal(0, 3, (G, 119)).astype(np.float32)
    logits[:, rng.integers(1, 119, 40)] += 6.0  # a few dominant elements, like real cells
    n = rng.integers(1, A + 1, G)
    got = np.asarray(counts_from_fractions(jnp.asarray(logits), jnp.asarray(n), A))
    for g in range(G):
        z = logits[g].astype(np.float64)
        z[0] = -np.inf
        p = np.exp(z - z.max())
        p /= p.sum()
        want = _to_sorted_list(_largest_remainder(p, int(n[g])), A)
        np.testing.assert_array_equal(got[g], want, err_msg=f"crystal {g}")
        assert (got[g, : n[g]] > 0).all() and (got[g, n[g] :] == 0).all()


def test_counts_exact_for_true_fractions():
    """log(true fractions) as logits decodes every composition exactly."""
    comps = [{8: 3, 22: 1, 38: 1}, {6: 24}, {1: 1}, {3: 2, 8: 4, 14: 1, 26: 5, 92: 8}]
    A = 24
    logits = np.full((len(comps), 119), -1e9, np.float32)
    n = np.array([sum(c.values()) for c in comps])
    for g, c in enumerate(comps):
        for e, k in c.items():
            logits[g, e] = np.log(k / n[g])
    got = np.asarray(counts_from_fractions(jnp.asarray(logits), jnp.asarray(n), A))
    for g, c in enumerate(comps):
        want = sorted(e for e, k in c.items() for _ in range(k))
        np.testing.assert_array_equal(got[g, : n[g]], want)


@pytest.fixture(scope="module")
def fractions_setup():
    rng = np.random.default_rng(5)
    graphs = [random_graph(rng, 5.0, n_atoms=(2, 5)) for _ in range(4)]
    model, settings = tiny_model(composition_head="fractions")
    batch = jax.tree.map(jnp.asarray, batch_graphs(graphs, PaddingBudget(30, 800, 5)))
    return model, settings, graphs, batch, tiny_params(model, settings)


def test_fraction_loss_is_the_cross_entropy_of_the_fractions(fractions_setup):
    model, settings, graphs, batch, params = fractions_setup
    z = make_encode_fn(model)(params, batch)
    gmask = batch.globals["mask"]
    dense = dense_layout(batch, settings.max_atoms)
    _, m = composition_loss(model, params, z, dense, gmask)
    _, logits = model.apply(params, z, dense.n_atoms, method=Autoencoder.decode_composition)
    logp = np.asarray(jax.nn.log_softmax(logits))
    per_atom = [-logp[g, z_] for g, gr in enumerate(graphs) for z_ in gr.numbers]
    np.testing.assert_allclose(float(m["l_species"]), np.mean(per_atom), rtol=1e-5)


def test_fraction_head_learns_a_batch_exactly(fractions_setup):
    """A few hundred Adam steps on one batch: the decoded composition (count, then the
    rounded fractions) equals the batch's own, crystal by crystal."""
    model, settings, graphs, batch, params = fractions_setup
    norm = compute_normalisers(graphs)
    loss_fn = make_loss_fn(model, settings, norm)
    opt = optax.adam(1e-2)

    @jax.jit
    def step(params, state, key):
        (_, m), g = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, upd), state, m

    state = opt.init(params)
    for i in range(150):
        params, state, m = step(params, state, jax.random.PRNGKey(i))
    assert float(m["composition_acc"]) == 1.0
    z = make_encode_fn(model)(params, batch)
    n_atoms, numbers = decode_composition(model, params, z)
    for g, gr in enumerate(graphs):
        assert int(n_atoms[g]) == len(gr.numbers)
        np.testing.assert_array_equal(np.asarray(numbers[g, : len(gr.numbers)]), sorted(gr.numbers))


def test_fraction_code_depends_on_the_composition_alone():
    """With the 'fractions' head z_comp is a function of the composition: two crystals
    of one composition but different cells and positions share it, while z_struct
    differs; another composition changes it."""
    rng = np.random.default_rng(11)
    model, settings = tiny_model(composition_head="fractions")
    params = tiny_params(model, settings)
    species = np.array([8, 8, 22, 38])
    one, two = random_crystal(rng, n_atoms=4), random_crystal(rng, n_atoms=4)
    a = Crystal(one.cell, one.frac_coords, species)
    b = Crystal(two.cell, two.frac_coords, species[::-1].copy())  # same multiset
    c = Crystal(two.cell, two.frac_coords, np.array([3, 8, 22, 38]))
    graphs = [crystal_to_graph(x, GraphSettings(cutoff=5.0)) for x in (a, b, c)]
    batch = jax.tree.map(jnp.asarray, batch_graphs(graphs, PaddingBudget(16, 800, 4)))
    enc = model.apply(params, batch, method=Autoencoder.encode)
    zc, zs = np.asarray(enc["z_comp"]), np.asarray(enc["z_struct"])
    np.testing.assert_allclose(zc[0], zc[1], rtol=1e-5, atol=1e-6)
    assert np.abs(zs[0] - zs[1]).max() > 1e-3
    assert np.abs(zc[0] - zc[2]).max() > 1e-4
