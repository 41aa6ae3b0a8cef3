"""Crystal type: geometry against ASE, I/O round trips against pymatgen, bad input."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.geometry import cell_to_cellpar, cellpar_to_cell
from conftest import random_triclinic
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Structure

from autoperi_jax.crystal import (
    Crystal,
    CrystalError,
    augment,
    cell_to_lattice_params,
    lattice_params_to_cell,
    random_rotation,
    read_structures,
    wrap_frac,
    write_structures,
)

MATCHER = StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3)


def test_lattice_params_match_ase_both_ways():
    rng = np.random.default_rng(0)
    for _ in range(50):
        params = np.concatenate([rng.uniform(2, 10, 3), rng.uniform(60, 120, 3)])
        ours = lattice_params_to_cell(params)
        if np.linalg.det(ours) <= 0.1:
            continue
        np.testing.assert_allclose(ours, cellpar_to_cell(params), atol=1e-10)
        np.testing.assert_allclose(cell_to_lattice_params(ours), params, atol=1e-8)
        rotated = ours @ random_rotation(rng).T
        np.testing.assert_allclose(
            cell_to_lattice_params(rotated), cell_to_cellpar(ours), atol=1e-8
        )


def test_lattice_params_work_under_jit():
    import jax
    import jax.numpy as jnp

    params = jnp.array([[3.0, 4.0, 5.0, 80.0, 95.0, 100.0]])
    cell = jax.jit(lattice_params_to_cell)(params)
    np.testing.assert_allclose(cell[0], cellpar_to_cell(np.asarray(params[0])), atol=1e-5)
    back = jax.jit(cell_to_lattice_params)(cell)
    np.testing.assert_allclose(back, params, atol=1e-3)


def test_wrap_is_strictly_below_one():
    w = wrap_frac(np.array([[-1e-17, 1.0, 2.5], [-0.25, 0.999, -3.0]]))
    assert np.all((w >= 0) & (w < 1))
    np.testing.assert_allclose(w, [[0, 0, 0.5], [0.75, 0.999, 0]])


def test_csv_crystal_cif_extxyz_round_trip(perov_test, tmp_path):
    crystals = [perov_test.crystal(i) for i in range(0, 3785, 95)]
    for c in crystals:
        back = Crystal.from_cif(c.to_cif(), name=c.name)
        assert MATCHER.fit(c.to_pymatgen(), back.to_pymatgen())
        np.testing.assert_array_equal(back.numbers, c.numbers)
        np.testing.assert_allclose(back.cell, c.cell, atol=1e-6)
    path = tmp_path / "out.extxyz"
    write_structures(crystals, path)
    back = read_structures(path)
    assert len(back) == len(crystals)
    for c, b in zip(crystals, back):
        np.testing.assert_array_equal(b.numbers, c.numbers)
        np.testing.assert_allclose(b.cell, c.cell, atol=1e-6)
        assert MATCHER.fit(c.to_pymatgen(), b.to_pymatgen())
        assert b.properties["heat_ref"] == pytest.approx(c.properties["heat_ref"])
        assert b.name == c.name
    # files that ASE and pymatgen read independently
    assert len(ase.io.read(path, ":")) == len(crystals)
    cif_dir = tmp_path / "cifs"
    write_structures(crystals[:3], cif_dir)
    files = sorted(cif_dir.glob("*.cif"))
    assert len(files) == 3
    for f in files:
        assert len(Structure.from_file(f)) == 5


def test_ase_and_pymatgen_conversions():
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    c = Crystal.from_ase(atoms)
    assert c.num_atoms == 8 and c.volume == pytest.approx(5.64**3)
    np.testing.assert_allclose(c.to_ase().get_positions(), atoms.get_positions(), atol=1e-10)
    s = c.to_pymatgen()
    assert s.composition.reduced_formula == "NaCl"
    c2 = Crystal.from_pymatgen(s)
    np.testing.assert_allclose(c2.cart_coords, c.cart_coords, atol=1e-10)
    assert c.density == pytest.approx(s.density, rel=1e-4)
    assert c.spacegroup() == 225


def test_standardization_and_niggli():
    fcc = Crystal.from_ase(bulk("Cu", "fcc", a=3.6, cubic=True))
    prim = fcc.standardize(to_primitive=True)
    assert prim.num_atoms == 1
    assert prim.volume == pytest.approx(fcc.volume / 4, rel=1e-6)
    conv = prim.standardize(to_primitive=False)
    assert conv.num_atoms == 4 and conv.spacegroup() == 225
    skew = Crystal(np.array([[3.0, 0, 0], [6.0, 3.0, 0], [1.0, 2.0, 3.0]]), [[0.1, 0.2, 0.3]], [6])
    red = skew.niggli()
    assert red.volume == pytest.approx(skew.volume)
    assert np.linalg.norm(red.cell, axis=1).max() < np.linalg.norm(skew.cell, axis=1).max()
    assert MATCHER.fit(skew.to_pymatgen(), red.to_pymatgen())


def test_augmentation_gives_the_same_crystal(perov_test):
    rng = np.random.default_rng(1)
    c = perov_test.crystal(10)
    for _ in range(5):
        a = augment(c, rng, rotate=True, shift=True, symmetry=True)
        assert MATCHER.fit(c.to_pymatgen(), a.to_pymatgen())
        assert a.spacegroup() == c.spacegroup()
        np.testing.assert_allclose(
            np.sort(a.to_ase().get_all_distances(mic=True).ravel()),
            np.sort(c.to_ase().get_all_distances(mic=True).ravel()),
            atol=1e-8,
        )
    rots, trans = c.symmetry_operations()
    assert len(rots) == len(trans) >= 1


def test_min_distance_includes_own_images():
    rng = np.random.default_rng(3)
    for _ in range(10):
        c = random_triclinic(rng, 3)
        ref = c.to_ase().get_all_distances(mic=True)
        np.fill_diagonal(ref, np.inf)
        shortest_vec = np.linalg.norm(c.niggli().cell, axis=1).min()
        assert c.min_distance() == pytest.approx(min(ref.min(), shortest_vec), rel=1e-9)


# ------------------------------------------------------------------------- bad input
def test_zero_and_negative_volume_are_rejected():
    with pytest.raises(CrystalError, match=r"'flat'.*volume"):
        Crystal(np.array([[1.0, 0, 0], [0, 1, 0], [1, 1, 0]]), [[0, 0, 0]], [1], name="flat")
    with pytest.raises(CrystalError, match="left-handed"):
        Crystal(-np.eye(3), [[0, 0, 0]], [1])


def test_overlapping_atoms_and_atom_budget():
    c = Crystal(np.eye(3) * 4, [[0, 0, 0], [0.075, 0, 0]], [8, 8], name="close")
    with pytest.raises(CrystalError, match=r"'close'.*0\.300 A apart"):
        c.validate()
    ok = Crystal(np.eye(3) * 4, [[0, 0, 0], [0.5, 0.5, 0.5]], [8, 8])
    ok.validate()
    with pytest.raises(CrystalError, match="more than the budget max_atoms=1"):
        ok.validate(max_atoms=1)


def test_non_periodic_and_malformed_inputs():
    with pytest.raises(CrystalError, match="not periodic"):
        Crystal.from_ase(Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]], cell=np.eye(3) * 5))
    with pytest.raises(CrystalError, match=r"'bad'.*malformed CIF"):
        Crystal.from_cif("data_x\n_cell_length_a 4\nloop_\n_atom_site_label\nX\n", name="bad")
    with pytest.raises(CrystalError, match="empty"):
        Crystal.from_cif("   \n", name="e")
    with pytest.raises(CrystalError, match="has no atoms"):
        Crystal(np.eye(3), np.zeros((0, 3)), [])
    with pytest.raises(CrystalError, match="NaN"):
        Crystal(np.eye(3), [[np.nan, 0, 0]], [1])
    with pytest.raises(CrystalError, match="1..118"):
        Crystal(np.eye(3), [[0, 0, 0]], [0])


def test_read_structures_errors(tmp_path):
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    with pytest.raises(CrystalError, match="empty.extxyz: file is empty"):
        read_structures(empty)
    garbage = tmp_path / "garbage.extxyz"
    garbage.write_text("this is not\nan xyz file\n")
    with pytest.raises(CrystalError, match="garbage.extxyz: cannot read"):
        read_structures(garbage)
    mol = tmp_path / "mol.xyz"
    ase.io.write(mol, Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]]))
    with pytest.raises(CrystalError, match="not periodic"):
        read_structures(mol)
