"""Pure pieces of autoperi_jax.model: lattice parameterisation, dense layout, in-jit
candidate edges, the torus flow path."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment as scipy_lsa

from autoperi_jax.crystal import cell_to_lattice_params, lattice_params_to_cell
from autoperi_jax.graph import neighbor_list
from autoperi_jax.model import (
    bond_targets,
    cell_to_y,
    compute_normalisers,
    dense_layout,
    flow_path,
    lattice_from_y,
    periodic_candidates,
    wrap_centered,
)
from autoperi_jax.testing import random_batch, random_crystal
from autoperi_jax.torus import linear_sum_assignment, ot_pair

UNIT = {"lattice_mean": [0.0] * 6, "lattice_std": [1.0] * 6}


def test_every_lattice_output_is_a_valid_cell():
    y = jax.random.normal(jax.random.PRNGKey(0), (1000, 6)) * 5.0
    cell = lattice_from_y(y, UNIT)
    det = jnp.linalg.det(cell)
    assert bool(jnp.all(det > 0))
    assert bool(jnp.all(cell[:, 0, 1:] == 0)) and bool(jnp.all(cell[:, 1, 2] == 0))


def test_lattice_roundtrip_through_y():
    rng = np.random.default_rng(0)
    cells = np.stack([random_crystal(rng, angle_jitter=25).cell for _ in range(20)])
    params = cell_to_lattice_params(cells)
    y = cell_to_y(params)
    back = np.asarray(lattice_from_y(jnp.asarray(y, jnp.float32), UNIT))
    np.testing.assert_allclose(back, lattice_params_to_cell(params), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(cell_to_lattice_params(back.astype(np.float64)), params, rtol=1e-4)
    # jax and numpy versions agree
    np.testing.assert_allclose(cell_to_y(jnp.asarray(params, jnp.float32)), y, rtol=1e-5, atol=1e-5)


def test_normalisers_standardise():
    rng = np.random.default_rng(1)
    _, graphs = random_batch(rng, 6, 4.0)
    norm = compute_normalisers(graphs)
    y = cell_to_y(cell_to_lattice_params(np.stack([g.cell for g in graphs])))
    z = (y - np.asarray(norm["lattice_mean"])) / np.asarray(norm["lattice_std"])
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-6)
    assert np.all(np.asarray(norm["lattice_std"]) >= 1e-3)


def test_dense_layout_roundtrip():
    rng = np.random.default_rng(2)
    batch, graphs = random_batch(rng, 3, 4.0, n_atoms=(2, 4))
    d = dense_layout(jax.tree.map(jnp.asarray, batch), 5)
    for g, gr in enumerate(graphs):
        n = len(gr.numbers)
        assert int(d.n_atoms[g]) == n
        np.testing.assert_array_equal(d.numbers[g, :n], gr.numbers)
        np.testing.assert_allclose(d.frac[g, :n], gr.frac_coords, atol=1e-6)
        assert bool(jnp.all(d.mask[g, :n])) and not bool(jnp.any(d.mask[g, n:]))
    assert int(d.n_atoms[-1]) == 0 and not bool(jnp.any(d.mask[-1]))


def test_candidates_match_host_neighbour_list():
    rng = np.random.default_rng(3)
    batch, graphs = random_batch(rng, 3, 4.0, n_atoms=(2, 4))
    d = dense_layout(jax.tree.map(jnp.asarray, batch), 4)
    c = jax.jit(lambda f, c, m: periodic_candidates(f, c, m, 4.0, 2, 300))(d.frac, d.cell, d.mask)
    assert not bool(c.overflow) and bool(jnp.all(c.complete[:3]))  # [3] = padding
    m = np.asarray(c.mask)
    got = {
        (int(e), int(r) % 4, int(s) % 4, *map(int, k))
        for e, r, s, k in zip(
            np.asarray(c.edge_graph)[m], np.asarray(c.receivers)[m],
            np.asarray(c.senders)[m], np.asarray(c.shifts)[m],
        )
    }  # fmt: skip
    want = set()
    for g, gr in enumerate(graphs):
        recv, send, shifts, _ = neighbor_list(gr.frac_coords, gr.cell, 4.0)
        want |= {(g, int(i), int(j), *map(int, k)) for i, j, k in zip(recv, send, shifts)}
    assert got == want
    # a budget that is too small is flagged
    small = periodic_candidates(d.frac, d.cell, d.mask, 4.0, 2, 2)
    assert bool(small.overflow)


def test_flow_path_ends_at_a_translate_of_the_data():
    key = jax.random.PRNGKey(0)
    x0 = jax.random.uniform(key, (2, 4, 3))
    x1 = jax.random.uniform(jax.random.PRNGKey(1), (2, 4, 3))
    mask = jnp.array([[True] * 4, [True, True, True, False]])
    xt, w = flow_path(x0, x1, jnp.array([1.0, 1.0]), mask)
    assert bool(jnp.all(jnp.abs(w) <= 1.0))
    np.testing.assert_allclose(jnp.sum(w, 1), 0.0, atol=1e-6)  # mean-free (0 on padding)
    assert float(jnp.abs(w[1, 3]).max()) == 0.0
    for g in range(2):
        n = int(mask[g].sum())
        delta = wrap_centered(xt[g, :n] - x1[g, :n])  # the same translation for every atom
        np.testing.assert_allclose(delta, jnp.broadcast_to(delta[0], delta.shape), atol=1e-5)
    x_half, _ = flow_path(x0, x1, jnp.array([0.0, 0.0]), mask)
    np.testing.assert_allclose(x_half, x0, atol=1e-6)


def test_bond_criterion():
    # O-O (r_cov 0.66 A): bonded below 1.25 * 1.32 = 1.65 A
    z = jnp.array([8, 8])
    d = jnp.array([1.5, 1.7])
    np.testing.assert_array_equal(bond_targets(z, z, d, 0.25), [True, False])


def test_ot_pair_is_the_best_same_species_permutation():
    rng = np.random.default_rng(4)
    x0 = rng.uniform(size=(2, 4, 3))
    x1 = rng.uniform(size=(2, 4, 3))
    numbers = np.array([[8, 8, 22, 8], [9, 7, 7, 0]])  # second crystal: one padding slot
    cell = np.stack([np.diag([3.0, 4.0, 5.0]), np.eye(3) * 4.0])
    out = np.asarray(ot_pair(*(jnp.asarray(a, jnp.float32) for a in (x0, x1)), numbers, cell))
    for g in range(2):
        best, best_cost = None, np.inf
        for p in itertools.permutations(range(4)):
            if np.any(numbers[g, list(p)] != numbers[g]):
                continue
            d = x1[g, list(p)] - x0[g]
            cost = np.sum(((d - np.round(d)) @ cell[g]) ** 2)
            if cost < best_cost:
                best, best_cost = list(p), cost
        np.testing.assert_allclose(out[g], x1[g, best], atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 5, 20, 52])
def test_linear_sum_assignment_equals_scipy(n):
    """The in-jit Hungarian method reaches scipy's optimum (random and tied costs)."""
    rng = np.random.default_rng(n)
    cost = rng.uniform(0, 10, size=(6, n, n)).astype(np.float32)
    cost[:3] = np.round(cost[:3])  # many ties
    cols = np.asarray(jax.jit(jax.vmap(linear_sum_assignment))(jnp.asarray(cost)))
    for g in range(len(cost)):
        assert sorted(cols[g].tolist()) == list(range(n))  # a permutation
        r, c = scipy_lsa(cost[g])
        np.testing.assert_allclose(
            cost[g][np.arange(n), cols[g]].sum(), cost[g][r, c].sum(), rtol=1e-6, atol=1e-4
        )


def _pairing_cost(x0, x1, cell):
    d = x1 - x0
    return np.sum(((d - np.round(d)) @ cell) ** 2)


def test_ot_pair_at_20_atoms_is_optimal_and_keeps_species():
    """A = 20 (MP-20 size): same species paired, total cost = scipy on the species-blocked
    cost matrix, and = brute force over the 7! pairings of a 7-atom species block."""
    rng = np.random.default_rng(5)
    G, A = 3, 20
    x0 = rng.uniform(size=(G, A, 3)).astype(np.float32)
    x1 = rng.uniform(size=(G, A, 3)).astype(np.float32)
    numbers = np.array([[8] * 7 + [22] * 6 + [56] * 7, [6] * 20, [3] * 10 + [9] * 8 + [0] * 2])
    cell = np.stack([np.diag([6.0, 7.0, 9.0]), np.eye(3) * 5.0, [[5, 0, 0], [2, 6, 0], [1, 1, 8]]])
    cell = cell.astype(np.float32)
    out = np.asarray(jax.jit(ot_pair)(x0, x1, numbers, cell))
    for g in range(G):
        # every output row is a data atom of the noise atom's species
        src = [int(np.argmin(np.abs(x1[g] - row).sum(-1))) for row in out[g]]
        assert sorted(src) == list(range(A))
        np.testing.assert_array_equal(numbers[g, src], numbers[g])
        d = x1[g][None, :, :] - x0[g][:, None, :]
        c = np.sum(np.einsum("ija,ab->ijb", d - np.round(d), cell[g]) ** 2, -1)
        c = np.where(numbers[g][:, None] == numbers[g][None, :], c, 1e6)
        r, col = scipy_lsa(c)
        np.testing.assert_allclose(
            _pairing_cost(x0[g], out[g], cell[g]), c[r, col].sum(), rtol=1e-5
        )
    # brute force over the oxygen block of crystal 0 (7! = 5040 pairings)
    block = slice(0, 7)
    brute = min(
        _pairing_cost(x0[0, block], x1[0, block][list(p)], cell[0])
        for p in itertools.permutations(range(7))
    )
    np.testing.assert_allclose(
        _pairing_cost(x0[0, block], out[0, block], cell[0]), brute, rtol=1e-5
    )


def test_align_translation_finds_the_nearest_translate():
    from autoperi_jax.model import align_translation

    x0 = jax.random.uniform(jax.random.PRNGKey(0), (3, 5, 3))
    x1 = jax.random.uniform(jax.random.PRNGKey(1), (3, 5, 3))
    mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    aligned = align_translation(x0, x1, mask)

    def cost(x):
        return jnp.sum(wrap_centered(x - x0) ** 2 * mask[..., None], 1)  # [G, 3]

    # the same crystal: one translation for all atoms of a crystal
    delta = np.asarray(wrap_centered(aligned - x1))
    m = np.asarray(mask)
    for g in range(3):
        np.testing.assert_allclose(
            delta[g, m[g]], np.broadcast_to(delta[g, :1], (m[g].sum(), 3)), atol=1e-5
        )
        assert np.all(delta[g, ~m[g]] == 0)  # padding rows untouched
    grid = jnp.linspace(0.0, 1.0, 801)
    brute = jnp.min(jnp.stack([cost(x1 + g) for g in grid]), 0)
    assert bool(jnp.all(cost(aligned) <= brute + 1e-5))
