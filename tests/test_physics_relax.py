"""FIRE relaxation (positions and cell) and the sampler's repulsive constraint layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from test_physics_potentials import padded_batch, perov_atoms

from autoperi_jax import physics


def test_batched_relaxation_reaches_fmax_checked_by_numpy_calculator(x64):
    pot = physics.uff_lennard_jones(cutoff=5.0)
    structures = perov_atoms(4)
    batch = padded_batch(structures, n_max=6)  # one padded slot per structure
    frac0 = batch[1]
    res = physics.batch_relax(*batch, potential=pot, n_images=(2, 2, 2), n_steps=1000,
                              fmax=1e-3)  # fmt: skip
    assert bool(jnp.all(res.converged))
    assert bool(jnp.all(res.fmax < 1e-3))
    np.testing.assert_array_equal(np.asarray(res.frac[:, 5]), np.asarray(frac0[:, 5]))
    e0 = physics.batch_energy(*batch, potential=pot, n_images=(2, 2, 2))
    assert bool(jnp.all(res.energy <= e0 + 1e-12))
    calc = physics.NumpyPairCalculator(pot)
    for b, a in enumerate(structures):
        relaxed = Atoms(numbers=a.numbers, cell=a.cell[:], pbc=True,
                        scaled_positions=np.asarray(res.frac[b, :5]))  # fmt: skip
        relaxed.calc = calc
        assert np.linalg.norm(relaxed.get_forces(), axis=1).max() < 1e-3
        assert relaxed.get_potential_energy() == pytest.approx(float(res.energy[b]), rel=1e-10)
    # the early-exit variant stops at the same state
    res2 = physics.batch_relax(*batch, potential=pot, n_images=(2, 2, 2), n_steps=1000,
                               fmax=1e-3, early_exit=True)  # fmt: skip
    np.testing.assert_allclose(np.asarray(res2.frac), np.asarray(res.frac), atol=1e-12)
    np.testing.assert_array_equal(np.asarray(res2.n_steps), np.asarray(res.n_steps))


def test_cell_relaxation_finds_fcc_lattice_constant(x64):
    """FIRE with strain DOF from a sheared, compressed fcc cell reaches zero stress at a0."""
    pot = physics.make_pair_potential(3.4, 0.0104, kind="lj", cutoff=8.5, onset=7.0)
    fcc = 0.5 * (np.ones((3, 3)) - np.eye(3))
    start = fcc * 5.1 @ np.array([[1.0, 0.03, 0.0], [0.0, 0.98, 0.02], [0.01, 0.0, 1.02]])
    res = physics.relax(jnp.asarray(start), jnp.zeros((1, 3)), jnp.array([18]),
                        potential=pot, n_images=(4, 4, 4), n_steps=3000, fmax=1e-5,
                        relax_cell=True, early_exit=True)  # fmt: skip
    assert bool(res.converged)
    assert np.abs(np.asarray(res.stress)).max() < 1e-5
    # reference a0 from a 1D minimisation of E(a) for the ideal fcc cell
    from scipy.optimize import minimize_scalar

    def e(a):
        return float(physics.energy(jnp.asarray(fcc * a), jnp.zeros((1, 3)), jnp.array([18]),
                                    potential=pot, n_images=(4, 4, 4)))  # fmt: skip

    a0 = minimize_scalar(e, bounds=(4.5, 6.0), method="bounded", options={"xatol": 1e-10}).x
    lengths = np.linalg.norm(np.asarray(res.cell), axis=1)
    np.testing.assert_allclose(lengths, a0 / np.sqrt(2), rtol=1e-4)
    gram = np.asarray(res.cell) @ np.asarray(res.cell).T
    np.testing.assert_allclose(gram / gram[0, 0], fcc @ fcc.T / (fcc @ fcc.T)[0, 0], atol=1e-4)


def test_repulsive_constraint_removes_overlaps_and_is_identity_on_valid(x64):
    rng = np.random.default_rng(0)
    ni = (2, 2, 2)
    cell = jnp.asarray(np.diag([4.0, 4.2, 4.4]) + 0.2 * rng.normal(size=(3, 3)))
    z = jnp.array([38, 22, 8, 8, 8, 0])
    mask = jnp.arange(6) < 5
    # O atoms squeezed onto Ti: several pairs well inside 0.6 (r_cov_i + r_cov_j)
    frac = jnp.asarray([[0, 0, 0], [0.5, 0.5, 0.5], [0.55, 0.5, 0.52], [0.47, 0.53, 0.5],
                        [0.5, 0.46, 0.47], [0.9, 0.9, 0.9]])  # fmt: skip
    before = physics.min_distance_ratio(cell, frac, z, mask, n_images=ni)
    assert float(before) < 0.3
    out = physics.repulsive_constraint(cell, frac, z, mask, n_images=ni)
    after = physics.min_distance_ratio(cell, out, z, mask, n_images=ni)
    assert float(after) > 0.99
    np.testing.assert_array_equal(np.asarray(out[5]), np.asarray(frac[5]))  # padding fixed
    # a valid crystal is left alone
    atoms = perov_atoms(1)[0]
    c, f, zz = (jnp.asarray(x) for x in (atoms.cell[:], atoms.get_scaled_positions(),
                                           atoms.numbers))  # fmt: skip
    assert float(physics.min_distance_ratio(c, f, zz, n_images=ni)) > 1.0
    np.testing.assert_allclose(
        np.asarray(physics.repulsive_constraint(c, f, zz, n_images=ni)), np.asarray(f), atol=1e-14
    )

    # differentiable, vmap-able, finite gradients
    def loss(fr):
        out = physics.repulsive_constraint(cell, fr, z, mask, n_images=ni)
        return jnp.sum(jnp.sin(3.0 * out))

    g = jax.jit(jax.grad(loss))(frac)
    assert np.all(np.isfinite(np.asarray(g)))
    eps = 1e-6
    d = jnp.zeros_like(frac).at[2, 0].set(eps)
    loss_jit = jax.jit(loss)
    fd = (loss_jit(frac + d) - loss_jit(frac - d)) / (2 * eps)
    assert float(g[2, 0]) == pytest.approx(float(fd), rel=1e-5, abs=1e-8)
    batched = jax.vmap(lambda f_: physics.repulsive_constraint(cell, f_, z, mask, n_images=ni))
    np.testing.assert_allclose(np.asarray(batched(jnp.stack([frac, frac]))[1]), np.asarray(out))


def test_batched_constraint_on_neighbour_lists_equals_the_dense_layer(x64):
    """`batched_repulsive_constraint` (one neighbour list built at the start) returns the
    dense layer's result: on crowded random structures whose lists are complete, and
    through the dense fallback when the list is too short (1 slot per atom: it overflows)
    or the skin too thin (0.05 A) for the distance the atoms move; a structure whose list
    is called complete equals the dense result in every setting."""
    from autoperi_jax.physics.relax import _listed_constraint

    rng = np.random.default_rng(3)
    ni = (2, 2, 2)
    b, n = 12, 6
    cell = np.diag([4.0, 4.2, 4.4]) + 0.2 * rng.normal(size=(b, 3, 3))
    frac = rng.uniform(size=(b, n, 3))
    frac[:, 1] = frac[:, 0] + 0.03  # an overlapping pair in every structure (~0.2 A)
    z = rng.choice([8, 22, 38, 55], size=(b, n))
    mask = np.arange(n)[None] < rng.integers(3, n + 1, size=(b, 1))
    cell, frac, z, mask = (jnp.asarray(x) for x in (cell, frac, z, mask))
    dense = jax.vmap(lambda c, f, zz, m: physics.repulsive_constraint(c, f, zz, m, n_images=ni))
    ref = np.asarray(dense(cell, frac, z, mask))
    assert float(np.abs(ref - np.asarray(frac) % 1.0).max()) > 0.01  # the layer acted

    def gap(a):  # [B] largest coordinate difference to the dense layer, per structure
        d = np.asarray(a) - ref
        return np.abs(d - np.round(d)).max(axis=(1, 2))

    def close(a):
        return float(gap(a).max())

    def listed(**kw):
        opts = dict(n_images=ni, n_steps=20, step_size=0.4,
                    potential=physics.covalent_soft_sphere(), **kw)  # fmt: skip
        return _listed_constraint(cell, frac, z, mask, **opts)

    out, complete = listed(max_neighbors=400, skin=4.0)  # atoms move up to 1.5 A here
    assert bool(jnp.all(complete)) and close(out) < 1e-10
    for kw in (dict(max_neighbors=1), dict(skin=0.05)):
        out, complete = listed(**{"max_neighbors": 400, "skin": 4.0, **kw})
        complete = np.asarray(complete)
        assert not complete.all(), kw
        # a list called complete is one the dense layer agrees with (the per-pair bound)
        assert np.all(gap(out)[complete] < 1e-10), kw
        # redone in a small dense batch (1.0: room for all 12) or the whole batch dense
        for redo in (1 / 16, 1.0):
            out = physics.batched_repulsive_constraint(
                cell, frac, z, mask, n_images=ni, redo_fraction=redo, **kw
            )
            assert close(out) < 1e-10, (kw, redo)
    out = physics.batched_repulsive_constraint(cell, frac, z, mask, n_images=ni)
    assert close(out) < 1e-10


def test_batched_min_distance_ratio_equals_the_dense_check_capped(x64):
    """`batched_min_distance_ratio` (one edge list within ``upto`` x the largest d_ij)
    equals ``min(upto, min_distance_ratio)`` on random structures with crowded and
    coincident atoms, one atom alone in a 1.9 A cell and padding, on the list and through
    its dense fallback (1 slot per atom: the list overflows)."""
    rng = np.random.default_rng(5)
    ni = (2, 2, 2)
    b, n = 10, 6
    cell = np.diag([4.0, 4.4, 5.0]) + 0.3 * rng.normal(size=(b, 3, 3))
    cell[0] = np.diag([1.9, 3.0, 3.2])  # one atom, images 1.9 A apart
    frac = rng.uniform(size=(b, n, 3))
    frac[2, 1] = frac[2, 0]  # coincident atoms: ratio 0
    frac[3, 1] = frac[3, 0] + 0.02  # a crowded pair
    z = rng.choice([1, 8, 22, 38, 55], size=(b, n))
    mask = np.arange(n)[None] < rng.integers(2, n + 1, size=(b, 1))
    mask[0] = np.arange(n) < 1
    mask[-1] = False  # a padding structure
    args = tuple(jnp.asarray(x) for x in (cell, frac, z, mask))
    contact = physics.covalent_soft_sphere(fraction=1.0)
    dense = np.array(
        [
            float(physics.min_distance_ratio(*(a[g] for a in args), n_images=ni, potential=contact))
            for g in range(b - 1)
        ]
    )
    assert dense[2] == 0.0 and dense.min() < 0.5 < 1.0 < dense.max()  # the cases are there
    for upto in (1.0, 1.3):
        for slots in (64, 1):
            got = np.asarray(
                physics.batched_min_distance_ratio(
                    *args, n_images=ni, potential=contact, upto=upto, max_neighbors=slots
                )
            )
            np.testing.assert_allclose(got[:-1], np.minimum(dense, upto), rtol=1e-9)
            assert got[-1] == upto  # no atoms, no contact


def test_min_distance_and_ratio_match_ase_and_flag_coincident_atoms(x64):
    """`min_distance` / `min_distance_ratio` against ASE's neighbour list on perovskites
    with a padded slot, and 0 for two atoms on one site (which ``DensePairs.valid`` drops
    as zero-length pairs: a check built on it would pass a merged structure)."""
    from ase.neighborlist import neighbor_list

    from autoperi_jax.elements import COVALENT_RADIUS

    ni = (2, 2, 2)
    for a in perov_atoms(3):
        i, j, d = neighbor_list("ijd", a, 6.0)
        r = np.asarray(COVALENT_RADIUS)[a.numbers]
        frac = np.concatenate([a.get_scaled_positions(), [[0.3, 0.3, 0.3]]])  # + padding
        z, mask = np.append(a.numbers, 0), np.arange(len(frac)) < len(a)
        args = (jnp.asarray(a.cell[:]), jnp.asarray(frac))
        assert float(physics.min_distance(*args, jnp.asarray(mask), n_images=ni)) == (
            pytest.approx(d.min(), rel=1e-9)
        )
        contact = physics.covalent_soft_sphere(fraction=1.0)  # d_ij = r_cov_i + r_cov_j
        ratio = physics.min_distance_ratio(
            *args, jnp.asarray(z), jnp.asarray(mask), n_images=ni, potential=contact
        )
        assert float(ratio) == pytest.approx(np.min(d / (r[i] + r[j])), rel=1e-9)
        merged = frac.copy()
        merged[1] = merged[0]  # B onto A
        args = (jnp.asarray(a.cell[:]), jnp.asarray(merged), jnp.asarray(z), jnp.asarray(mask))
        assert float(physics.min_distance(args[0], args[1], args[3], n_images=ni)) == 0.0
        assert float(physics.min_distance_ratio(*args, n_images=ni)) == 0.0
