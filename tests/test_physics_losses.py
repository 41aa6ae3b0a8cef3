"""Coordination chemistry, L_chem and L_phys: known values, batching, gradients vs FD."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk
from test_physics_potentials import padded_batch, perov_atoms

from autoperi_jax import physics

SRTIO3 = (
    np.eye(3) * 3.905,
    np.array([[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]),
    np.array([38, 22, 8, 8, 8]),
)


def _cn(cell, frac, z):
    ni = physics.n_images_for_cutoff(np.asarray(cell), 6.0)
    return physics.coordination_numbers(jnp.asarray(cell), jnp.asarray(frac), jnp.asarray(z),
                                        n_images=ni)  # fmt: skip


def test_coordination_numbers_of_known_crystals():
    co = _cn(*SRTIO3)
    np.testing.assert_array_equal(np.asarray(co.role), [-1, -1, 1, 1, 1])
    np.testing.assert_allclose(np.asarray(co.cn), [12, 6, 6, 6, 6], atol=0.15)
    np.testing.assert_array_equal(np.asarray(co.wrong), 0.0)
    for atoms, cn in [(bulk("NaCl", "rocksalt", a=5.64), 6), (bulk("CsCl", "cesiumchloride",
                      a=4.12), 8), (bulk("ZnS", "zincblende", a=5.41), 4)]:  # fmt: skip
        co = _cn(atoms.cell[:], atoms.get_scaled_positions(), atoms.numbers)
        np.testing.assert_allclose(np.asarray(co.cn), cn, atol=0.35)
        np.testing.assert_array_equal(np.asarray(co.role), [-1, 1])
    # non-polar: covalent radii, every neighbour counts (D3 gives ~4.5 for diamond)
    c = bulk("C", "diamond", a=3.567)
    co = _cn(c.cell[:], c.get_scaled_positions(), c.numbers)
    np.testing.assert_array_equal(np.asarray(co.role), [0, 0])
    assert np.all((np.asarray(co.cn) > 4.0) & (np.asarray(co.cn) < 4.7))


def test_wrong_sign_neighbours_and_gradient_direction(x64):
    cell, frac, z = SRTIO3
    frac = frac.copy()
    frac[3] = frac[2] + np.array([0.0, 0.0, 0.12])  # O pushed 0.47 A from another O
    co = _cn(cell, frac, z)
    assert float(co.wrong[2]) > 0.9 and float(co.wrong[3]) > 0.9

    def l_en(f):
        return physics.chem_loss(jnp.asarray(cell), f, jnp.asarray(z), None, None,
                                 n_images=(2, 2, 2))  # fmt: skip

    g = jax.grad(l_en)(jnp.asarray(frac))
    # descending the loss moves the two O atoms apart along z
    assert float(g[3, 2]) < 0 < float(g[2, 2])


def test_ideal_cn_table_from_reference_crystals():
    structures = perov_atoms(16, split="train")
    cell, frac, z, mask = padded_batch(structures)
    table = physics.ideal_cn_table(cell, frac, z, mask, n_images=(2, 2, 2))
    present = np.unique(np.asarray(z)[np.asarray(mask)])
    assert np.all(table[present] > 0.5) and np.all(table[present] < 14)
    assert np.all(table[np.setdiff1d(np.arange(119), present)] == -1)
    ideal = physics.ideal_cn_from_table(jnp.asarray(table), z[0])
    assert ideal.shape == (5,)


def test_l_phys_batched_padded_equals_single():
    pot = physics.uff_lennard_jones(cutoff=5.0)
    structures = perov_atoms(3)
    cell, frac, z, mask = padded_batch(structures, n_max=6)
    table = jnp.asarray(np.where(np.arange(119) > 0, 6.0, -1.0))
    ideal = physics.ideal_cn_from_table(table, z)
    kw = dict(potential=pot, n_images=(2, 2, 2))
    out = jax.jit(lambda *a: physics.batch_physics_losses(*a, ideal_cn=ideal, **kw))(
        cell, frac, z, mask
    )
    assert set(out) == {"energy", "stability", "chem", "total"}
    for b, a in enumerate(structures):
        single = physics.physics_losses(
            jnp.asarray(a.cell[:]), jnp.asarray(a.get_scaled_positions()), jnp.asarray(a.numbers),
            ideal_cn=jnp.full(5, 6.0), **kw,
        )  # fmt: skip
        for k in out:
            assert float(out[k][b]) == pytest.approx(float(single[k]), rel=1e-4, abs=1e-5)
    e_ref = physics.energy(jnp.asarray(structures[0].cell[:]),
                           jnp.asarray(structures[0].get_scaled_positions()),
                           jnp.asarray(structures[0].numbers), **kw) / 5  # fmt: skip
    assert float(out["energy"][0]) == pytest.approx(float(e_ref), rel=1e-5)
    assert float(out["stability"][0]) > 0  # UFF LJ perovskites are dynamically unstable
    np.testing.assert_allclose(
        np.asarray(out["total"]),
        np.asarray(out["energy"] + out["stability"] + out["chem"]), rtol=1e-6,
    )  # fmt: skip


def test_l_phys_gradients_match_finite_differences(x64):
    """d L_phys / d frac and d L_phys / d cell against central differences (all three terms)."""
    pot = physics.uff_lennard_jones(cutoff=5.0)
    atoms = perov_atoms(1)[0]
    rng = np.random.default_rng(5)
    cell0 = jnp.asarray(atoms.cell[:] @ (np.eye(3) + 0.02 * rng.normal(size=(3, 3))))
    frac0 = jnp.asarray(atoms.get_scaled_positions() + 0.02 * rng.normal(size=(5, 3)))
    z = jnp.asarray(atoms.numbers)
    kw = dict(potential=pot, n_images=(2, 2, 2), ideal_cn=jnp.array([9.0, 5.0, 4.0, 4.0, 4.0]),
              qpoints=jnp.asarray(physics.gamma_and_mp_grid((2, 2, 2))))  # fmt: skip

    @jax.jit
    def loss(c, f):
        return physics.l_phys(c, f, z, None, **kw)

    parts = physics.physics_losses(cell0, frac0, z, None, **kw)
    assert all(float(parts[k]) > 0 for k in ("stability", "chem"))
    g_cell, g_frac = jax.grad(loss, argnums=(0, 1))(cell0, frac0)
    eps = 1e-6
    for idx in [(1, 2), (3, 1), (4, 0)]:
        d = jnp.zeros_like(frac0).at[idx].set(eps)
        fd = (loss(cell0, frac0 + d) - loss(cell0, frac0 - d)) / (2 * eps)
        assert float(g_frac[idx]) == pytest.approx(float(fd), rel=1e-4, abs=1e-6)
    for idx in [(0, 0), (0, 1), (2, 2)]:
        d = jnp.zeros_like(cell0).at[idx].set(eps)
        fd = (loss(cell0 + d, frac0) - loss(cell0 - d, frac0)) / (2 * eps)
        assert float(g_cell[idx]) == pytest.approx(float(fd), rel=1e-4, abs=1e-6)


def test_objective_fn_gradients_match_finite_differences(x64):
    """The training loss's batched L_phys (`make_objective_fn`, references on): d/d frac and
    d/d cell against central differences; a padding graph costs 0 with zero gradient. The
    phonon term is off (its gradient is checked above; its compilation would triple the
    test's time)."""
    atoms = perov_atoms(1)[0]
    rng = np.random.default_rng(7)
    cell1 = atoms.cell[:] @ (np.eye(3) + 0.02 * rng.normal(size=(3, 3)))
    cell0 = jnp.asarray(np.stack([cell1, np.eye(3)]))  # [2, 3, 3]; graph 1: padding
    ref = jnp.asarray(np.stack([atoms.get_scaled_positions(), np.zeros((5, 3))]))  # [2, 5, 3]
    frac0 = ref + jnp.asarray(0.02 * rng.normal(size=(2, 5, 3)))
    z = jnp.asarray(np.stack([atoms.numbers, np.zeros(5, int)]))  # [2, 5]
    obj = physics.PhysicsObjective(
        potential=physics.uff_lennard_jones(cutoff=5.0),
        n_images=physics.n_images_for_cutoff(cell1[None], 5.0),
        qpoints=physics.gamma_and_mp_grid((1, 1, 1)),
        weights=(1.0, 0.0, 1.0),
    )
    phys_fn = physics.make_objective_fn(obj)

    @jax.jit
    def loss(c, f):
        return jnp.sum(phys_fn(c, f, z, z > 0, ref)["total"])

    out = phys_fn(cell0, frac0, z, z > 0, ref)
    assert float(out["energy"][0]) > 0 and float(out["chem"][0]) > 0
    assert float(out["total"][1]) == 0.0
    g_cell, g_frac = jax.grad(loss, argnums=(0, 1))(cell0, frac0)
    assert np.all(np.asarray(g_frac[1]) == 0) and np.all(np.asarray(g_cell[1]) == 0)
    eps = 1e-6
    for idx in [(0, 1, 2), (0, 3, 1), (0, 4, 0)]:
        d = jnp.zeros_like(frac0).at[idx].set(eps)
        fd = (loss(cell0, frac0 + d) - loss(cell0, frac0 - d)) / (2 * eps)
        assert float(g_frac[idx]) == pytest.approx(float(fd), rel=1e-4, abs=1e-6)
    for idx in [(0, 0, 0), (0, 0, 1), (0, 2, 2)]:
        d = jnp.zeros_like(cell0).at[idx].set(eps)
        fd = (loss(cell0 + d, frac0) - loss(cell0 - d, frac0)) / (2 * eps)
        assert float(g_cell[idx]) == pytest.approx(float(fd), rel=1e-4, abs=1e-6)
