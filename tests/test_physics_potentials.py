"""Pair energies, forces and stress against independent ASE / NumPy implementations."""

from __future__ import annotations

import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.lj import LennardJones
from ase.neighborlist import neighbor_list
from ase.stress import full_3x3_to_voigt_6_stress

from autoperi_jax import physics
from autoperi_jax.physics import elements

REPO = Path(__file__).resolve().parents[1]


def perov_atoms(n: int = 5, split: str = "test") -> list[Atoms]:
    """The first ``n`` Perov-5 crystals of a split as ``ase.Atoms``."""
    import pandas as pd
    from pymatgen.core import Structure
    from pymatgen.io.ase import AseAtomsAdaptor

    path = REPO / "autoperi_jax" / "data" / "perov_5" / f"{split}.csv.xz"
    if not path.exists():
        path = REPO.parent / "shared" / "data" / "perov_5" / f"{split}.csv"
    df = pd.read_csv(path, nrows=n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [AseAtomsAdaptor.get_atoms(Structure.from_str(c, fmt="cif")) for c in df["cif"]]


def random_small_cells(rng: np.random.Generator, count: int, min_dist: float = 1.0):
    """Random triclinic cells with 2.2-4 A vectors (all below the 6 A cutoff) and 1-4 atoms."""
    out = []
    while len(out) < count:
        lengths = rng.uniform(2.2, 4.0, size=3)
        angles = np.radians(rng.uniform(65.0, 115.0, size=3))
        a, b, c = lengths
        al, be, ga = angles
        cx = c * np.cos(be)
        cy = c * (np.cos(al) - np.cos(be) * np.cos(ga)) / np.sin(ga)
        cz2 = c * c - cx * cx - cy * cy
        if cz2 < (0.4 * c) ** 2:
            continue
        cell = np.array([[a, 0, 0], [b * np.cos(ga), b * np.sin(ga), 0], [cx, cy, np.sqrt(cz2)]])
        n = int(rng.integers(1, 5))
        atoms = Atoms(
            numbers=rng.choice([8, 22, 38, 56, 9, 7], size=n),
            cell=cell,
            scaled_positions=rng.uniform(size=(n, 3)),
            pbc=True,
        )
        _, _, d = neighbor_list("ijd", atoms, min_dist)
        if len(d) == 0:
            out.append(atoms)
    return out


def padded_batch(structures: list[Atoms], n_max: int | None = None):
    """Stack structures into a padded batch ``(cell, frac, numbers, mask)`` of jax arrays."""
    n_max = n_max or max(len(a) for a in structures)
    cells, fracs, nums, masks = [], [], [], []
    for a in structures:
        n = len(a)
        cells.append(a.cell[:])
        fracs.append(np.concatenate([a.get_scaled_positions(wrap=False), np.zeros((n_max - n, 3))]))
        nums.append(np.concatenate([a.numbers, np.zeros(n_max - n, int)]))
        masks.append(np.arange(n_max) < n)
    return tuple(jnp.asarray(np.array(x)) for x in (cells, fracs, nums, masks))


def jax_efs(atoms: Atoms, potential, n_images=None):
    cell = jnp.asarray(atoms.cell[:])
    frac = jnp.asarray(atoms.get_scaled_positions(wrap=False))
    n_images = n_images or physics.n_images_for_cutoff(atoms.cell[:], potential.cutoff)
    e, f, s = physics.energy_forces_stress(
        cell, frac, jnp.asarray(atoms.numbers), potential=potential, n_images=n_images
    )
    return float(e), np.asarray(f), np.asarray(s)


def assert_batch_matches(structures: list[Atoms], potential, calc, rtol: float = 1e-5):
    """One jitted padded-batch call against the reference calculator, structure by structure."""
    batch = padded_batch(structures)
    ni = physics.n_images_for_cutoff(np.asarray(batch[0]), potential.cutoff)
    e, f, s = physics.batch_energy_forces_stress(*batch, potential=potential, n_images=ni)
    for b, atoms in enumerate(structures):
        atoms = atoms.copy()
        atoms.calc = calc
        e_ref, f_ref, s_ref = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
        scale_f = max(np.abs(f_ref).max(), 1e-3)
        scale_s = max(np.abs(s_ref).max(), 1e-6)
        assert abs(float(e[b]) - e_ref) <= rtol * max(abs(e_ref), 1e-3), (float(e[b]), e_ref)
        f_b = np.asarray(f[b])
        np.testing.assert_allclose(f_b[: len(atoms)], f_ref, rtol=0, atol=rtol * scale_f)
        np.testing.assert_array_equal(f_b[len(atoms) :], 0.0)
        s_b = full_3x3_to_voigt_6_stress(np.asarray(s[b]))
        np.testing.assert_allclose(s_b, s_ref, rtol=0, atol=rtol * scale_s)


def test_uff_table_values():
    # Rappe et al. 1992 Table 1 spot checks (x_i in A, D_i in kcal/mol)
    for z, x, d in [(8, 3.500, 0.060), (20, 3.399, 0.238), (22, 3.175, 0.017), (38, 3.641, 0.235)]:
        assert elements.UFF_X[z] == x
        assert elements.UFF_D[z] == pytest.approx(d * 0.0433641, rel=1e-6)
    assert np.all(elements.HAS_UFF[1:104]) and not elements.HAS_UFF[0]


def test_chi_and_radius_tables_match_pymatgen():
    ref = elements.tables_from_pymatgen()
    np.testing.assert_array_equal(elements.PAULING_CHI, ref["pauling_chi"])
    np.testing.assert_array_equal(elements.CATION_RADIUS, ref["cation_radius"])
    np.testing.assert_array_equal(elements.ANION_RADIUS, ref["anion_radius"])


@pytest.mark.parametrize("smooth", [False, True])
def test_lennard_jones_matches_ase(x64, smooth):
    rc = 6.0
    mode = "smooth" if smooth else "shift"
    pot = physics.make_pair_potential(2.3, 0.05, kind="lj", cutoff=rc, onset=0.66 * rc,
                                      cutoff_mode=mode)  # fmt: skip
    calc = LennardJones(sigma=2.3, epsilon=0.05, rc=rc, ro=0.66 * rc, smooth=smooth)
    structures = perov_atoms(5) + random_small_cells(np.random.default_rng(0), 4)
    assert_batch_matches(structures, pot, calc)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: physics.uff_lennard_jones(cutoff=6.0, cutoff_mode="smooth"),
        lambda: physics.uff_lennard_jones(
            cutoff=6.0, cutoff_mode="shift", mixing="lorentz_berthelot"
        ),
        lambda: physics.uff_morse(cutoff=6.0, cutoff_mode="none"),
        lambda: physics.covalent_soft_sphere(fraction=1.1),
    ],
    ids=["uff_lj_smooth", "uff_lj_shift_lb", "uff_morse_none", "soft_sphere"],
)
def test_element_dependent_matches_numpy_reference(x64, factory):
    pot = factory()
    calc = physics.NumpyPairCalculator(pot)
    assert_batch_matches(
        perov_atoms(5) + random_small_cells(np.random.default_rng(1), 3), pot, calc
    )


def test_numpy_reference_against_explicit_double_loop():
    """The NumPy calculator against a literal sum over atoms and image shifts."""
    pot = physics.uff_lennard_jones(cutoff=5.0, cutoff_mode="shift")
    atoms = perov_atoms(1)[0]
    from autoperi_jax.physics.reference import pair_energy_and_derivative

    cell, pos, z = atoms.cell[:], atoms.positions, atoms.numbers
    n = 3
    e = 0.0
    for i in range(len(atoms)):
        for j in range(len(atoms)):
            for k in np.ndindex(2 * n + 1, 2 * n + 1, 2 * n + 1):
                shift = np.array(k) - n
                if i == j and not shift.any():
                    continue
                r = np.linalg.norm(pos[j] + shift @ cell - pos[i])
                if r < pot.cutoff:
                    e += 0.5 * pair_energy_and_derivative(pot, np.array([r]), z[i], z[j])[0][0]
    atoms.calc = physics.NumpyPairCalculator(pot)
    assert atoms.get_potential_energy() == pytest.approx(e, rel=1e-12)


def test_padded_batch_equals_single(x64):
    """Extra padding and batching change nothing (per-structure calls as the reference)."""
    pot = physics.uff_lennard_jones(cutoff=6.0)
    structures = perov_atoms(2) + random_small_cells(np.random.default_rng(2), 1)
    batch = padded_batch(structures, n_max=7)
    ni = physics.n_images_for_cutoff(np.asarray(batch[0]), 6.0)
    e, f, s = physics.batch_energy_forces_stress(*batch, potential=pot, n_images=ni)
    e_only = physics.batch_energy(*batch, potential=pot, n_images=ni)
    np.testing.assert_allclose(np.asarray(e_only), np.asarray(e), rtol=1e-12)
    for b, a in enumerate(structures):
        e1, f1, s1 = jax_efs(a, pot, ni)
        assert float(e[b]) == pytest.approx(e1, rel=1e-12)
        np.testing.assert_allclose(np.asarray(f[b, : len(a)]), f1, atol=1e-10)
        np.testing.assert_allclose(np.asarray(s[b]), s1, atol=1e-12)


def test_invariances_rotation_translation_wrap_permutation(x64):
    pot = physics.uff_morse(cutoff=6.0)
    atoms = perov_atoms(1)[0]
    cell = np.asarray(atoms.cell[:])
    frac = atoms.get_scaled_positions()
    z = atoms.numbers
    ni = (3, 3, 3)

    def efs(c, f, zz):
        out = physics.energy_forces_stress(
            jnp.asarray(c), jnp.asarray(f), jnp.asarray(zz), potential=pot, n_images=ni
        )
        return [np.asarray(o) for o in out]

    e0, f0, s0 = efs(cell, frac, z)
    rot = jnp.asarray(
        np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))[0], dtype=jnp.float64
    )
    rot = np.asarray(rot) * np.sign(np.linalg.det(np.asarray(rot)))
    e1, f1, s1 = efs(cell @ rot.T, frac, z)  # rows rotated: cart' = cart @ R^T
    assert e1 == pytest.approx(e0, rel=1e-12)
    np.testing.assert_allclose(f1, f0 @ rot.T, atol=1e-9)
    np.testing.assert_allclose(s1, rot @ s0 @ rot.T, atol=1e-12)
    e2, f2, _ = efs(cell, frac + np.array([0.31, -0.17, 0.52]), z)
    assert e2 == pytest.approx(e0, rel=1e-12)
    np.testing.assert_allclose(f2, f0, atol=1e-9)
    wrapped = frac + np.array([[1, 0, -2], [0, 0, 0], [-1, 3, 0], [0, 0, 1], [2, 2, 2]])
    e3, f3, _ = efs(cell, wrapped, z)
    assert e3 == pytest.approx(e0, rel=1e-12)
    np.testing.assert_allclose(f3, f0, atol=1e-9)
    perm = np.array([3, 1, 4, 0, 2])
    e4, f4, _ = efs(cell, frac[perm], z[perm])
    assert e4 == pytest.approx(e0, rel=1e-12)
    np.testing.assert_allclose(f4, f0[perm], atol=1e-9)


def test_image_stencil_helpers():
    cell = np.diag([2.4, 3.0, 10.0])
    assert physics.n_images_for_cutoff(cell, 6.0) == (3, 2, 1)
    assert bool(physics.images_cover_cutoff(jnp.asarray(cell), 6.0, (3, 2, 1)))
    assert not bool(physics.images_cover_cutoff(jnp.asarray(cell), 6.0, (2, 2, 1)))
    # a too-small stencil really misses interactions
    pot = physics.uff_lennard_jones(cutoff=6.0)
    args = (jnp.asarray(cell), jnp.zeros((1, 3)), jnp.array([8]))
    e_ok = physics.energy(*args, potential=pot, n_images=(3, 2, 1))
    e_bad = physics.energy(*args, potential=pot, n_images=(1, 1, 1))
    assert abs(float(e_ok - e_bad)) > 1e-4


def test_gradients_finite_with_padding_and_coincident_padded_atoms():
    pot = physics.uff_lennard_jones(cutoff=5.0)
    cell = jnp.eye(3) * 4.0
    frac = jnp.array([[0.0, 0, 0], [0.5, 0.5, 0.5], [0.0, 0, 0], [0.0, 0, 0]])
    z = jnp.array([38, 8, 0, 0])
    mask = jnp.array([True, True, False, False])

    def e(c, f):
        return physics.energy(c, f, z, mask, potential=pot, n_images=(2, 2, 2))

    g_c, g_f = jax.grad(e, argnums=(0, 1))(cell, frac)
    assert np.all(np.isfinite(np.asarray(g_c))) and np.all(np.isfinite(np.asarray(g_f)))
    np.testing.assert_array_equal(np.asarray(g_f[2:]), 0.0)
