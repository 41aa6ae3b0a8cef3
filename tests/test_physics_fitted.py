"""The fitted (Born-Mayer + Morse + Coulomb) pair potential: derivatives, phonons, mixing,
its JSON file, an exact-inverse fit and the ``fit-potential`` command end to end."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from test_physics_phonons import COMMENSURATE_Q, compare_with_phonopy, relaxed
from test_physics_potentials import jax_efs, perov_atoms

from autoperi_jax import physics
from autoperi_jax.physics import fit, fitted
from autoperi_jax.physics.reference import NumpyPairCalculator

NA, CL, O, TI = 11, 17, 8, 22


def known_potential() -> fitted.FittedPotential:
    """A hand-set ionic potential (independent of any fit): Na+/Cl- and Ti/O charges."""
    p = fitted.default_element_params()
    p.charge[[NA, CL, TI, O]] = [0.8, -0.8, 1.6, -0.8]
    p.radius[[NA, CL, TI, O]] = [1.3, 1.5, 1.1, 0.9]
    p.morse_depth[[NA, CL, TI, O]] = [0.2, 0.4, 0.6, 0.3]
    p.born_a[[NA, CL]] = [900.0, 1400.0]
    p.born_rho[[NA, CL]] = [0.28, 0.33]
    present = np.zeros(119, bool)
    present[[NA, CL, TI, O]] = True
    e0 = np.where(present, -1.5, 0.0)
    e0[CL] = -2.5
    return fitted.FittedPotential(params=p, e0=e0, fitted=present, cutoff=6.0, onset=5.0)


def rocksalt(a: float = 5.6, rattle: float = 0.0, seed: int = 0) -> Atoms:
    rng = np.random.default_rng(seed)
    frac = np.array([[0, 0, 0], [0.5, 0.5, 0.5]]) + rattle * rng.normal(size=(2, 3))
    cell = (
        a
        / 2
        * np.array([[0, 1, 1], [1, 0, 1], [1, 1, 0]])
        @ (np.eye(3) + 0.02 * rng.normal(size=(3, 3)))
    )
    return Atoms(numbers=[NA, CL], cell=cell, scaled_positions=frac % 1.0, pbc=True)


def triclinic_nacl(seed: int) -> Atoms:
    """A rattled, sheared 4-atom NaCl cell (conventional half cell)."""
    rng = np.random.default_rng(seed)
    cell = np.diag([5.6, 5.6, 2.9]) @ (np.eye(3) + 0.04 * rng.normal(size=(3, 3)))
    frac = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    frac = frac + 0.02 * rng.normal(size=(4, 3))
    return Atoms(numbers=[NA, NA, CL, CL], cell=cell, scaled_positions=frac % 1.0, pbc=True)


def test_forces_and_stress_are_energy_derivatives(x64):
    """Central finite differences of E in Cartesian positions and in the strain."""
    pot = known_potential().potential()
    atoms = triclinic_nacl(1)
    ni = physics.n_images_for_cutoff(atoms.cell[:], pot.cutoff)
    cell = jnp.asarray(atoms.cell[:])
    z = jnp.asarray(atoms.numbers)
    pos = atoms.get_positions()
    _, f, s = jax_efs(atoms, pot, ni)

    def e_at(c, x):
        frac = jnp.asarray(x @ np.linalg.inv(c))
        return float(physics.energy(jnp.asarray(c), frac, z, potential=pot, n_images=ni))

    h = 1e-5
    fd = np.zeros_like(pos)
    for i in range(len(atoms)):
        for a in range(3):
            xp, xm = pos.copy(), pos.copy()
            xp[i, a] += h
            xm[i, a] -= h
            fd[i, a] = -(e_at(cell, xp) - e_at(cell, xm)) / (2 * h)
    np.testing.assert_allclose(f, fd, atol=1e-6 * max(1.0, np.abs(fd).max()))
    assert np.abs(f).max() > 0.05  # a real test: the rattled cell has sizeable forces
    vol = abs(np.linalg.det(atoms.cell[:]))
    fd_s = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            ep = np.eye(3)
            ep[a, b] += h
            em = np.eye(3)
            em[a, b] -= h
            c0 = np.asarray(cell)
            fd_s[a, b] = (e_at(c0 @ ep, pos @ ep) - e_at(c0 @ em, pos @ em)) / (2 * h * vol)
    np.testing.assert_allclose(s, fd_s, atol=1e-7 * max(1.0, np.abs(fd_s).max() * 1e3))


def test_matches_numpy_reference_calculator(x64):
    """Energy, forces and stress equal the closed-form NumPy/ASE implementation."""
    pot = known_potential().potential()
    for seed in range(3):
        atoms = triclinic_nacl(seed)
        e, f, s = jax_efs(atoms, pot)
        atoms.calc = NumpyPairCalculator(pot)
        assert e == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
        np.testing.assert_allclose(f, atoms.get_forces(), atol=1e-9)
        np.testing.assert_allclose(s, atoms.get_stress(voigt=False), atol=1e-11)


def test_mixing_rules_symmetric_and_as_documented():
    p = known_potential().params
    r0, depth, a, extra = (np.asarray(t) for t in fitted.mix(p))
    for t in (r0, depth, a, *extra):
        np.testing.assert_array_equal(t, t.T)
    assert r0[NA, CL] == pytest.approx(p.radius[NA] + p.radius[CL])
    assert depth[NA, CL] == pytest.approx(np.sqrt(p.morse_depth[NA] * p.morse_depth[CL]))
    assert extra[0, NA, CL] == pytest.approx(np.sqrt(p.born_a[NA] * p.born_a[CL]))
    assert extra[1, NA, CL] == pytest.approx(0.5 * (p.born_rho[NA] + p.born_rho[CL]))
    assert extra[2, NA, CL] == pytest.approx(p.charge[NA] * p.charge[CL])


def test_no_collapse_at_short_range():
    """The Gaussian-smeared Coulomb stays finite: the pair energy is repulsive near r = 0."""
    pot = known_potential().potential()
    r = jnp.linspace(1e-4, 1.0, 50)
    v = np.asarray(physics.pair_energy(pot, r, jnp.full(50, NA), jnp.full(50, CL)))
    assert np.all(np.isfinite(v)) and np.all(v > 0)


def test_phonons_equal_phonopy_shipped_potential(x64):
    """The shipped potential's supercell-free phonons equal phonopy's finite displacements
    on two Perov-5 crystals relaxed under it (commensurate q: exact)."""
    pot = fitted.load_potential("fitted_chgnet")
    assert pot.kind == "born_morse_coulomb"
    structures = relaxed(perov_atoms(2), pot, (2, 2, 2))
    for atoms in structures:
        compare_with_phonopy(atoms, pot, (2, 2, 2), COMMENSURATE_Q)


def test_shipped_file_round_trips(tmp_path):
    fp = fitted.load_fitted("fitted_chgnet")
    assert "fitted_chgnet" in fitted.shipped_potentials()
    assert fp.fitted[O] and fp.meta["errors_held_out"]["n_structures"] > 0
    path = tmp_path / "again.json"
    fp.save(path)
    back = fitted.load_fitted(path)
    assert json.loads(path.read_text()) == fp.to_json()
    for k in fitted.PARAM_NAMES:
        np.testing.assert_array_equal(getattr(back.params, k), getattr(fp.params, k))
    np.testing.assert_array_equal(back.e0, fp.e0)
    np.testing.assert_array_equal(back.fitted, fp.fitted)
    a, b = fp.potential(), back.potential()
    np.testing.assert_array_equal(np.asarray(a.extra), np.asarray(b.extra))
    with pytest.raises(FileNotFoundError, match="shipped"):
        fitted.load_fitted("no_such_potential")


def _labels(fp: fitted.FittedPotential, structures: list[Atoms]) -> list[fit.Labelled]:
    """Labels from the dense autodiff path (`energy_forces_stress`), not the fit's edges."""
    pot = fp.potential()
    out = []
    for a in structures:
        e, f, s = jax_efs(a, pot)
        out.append(fit.Labelled(a.cell[:], a.get_scaled_positions(), a.numbers,
                                e + fp.reference_energy(a.numbers), f, s))  # fmt: skip
    return out


def test_edge_predictions_equal_dense_autodiff(x64):
    fp = known_potential()
    data = _labels(fp, [triclinic_nacl(s) for s in range(3)] + [rocksalt(rattle=0.03)])
    for (e, f, s), d in zip(fit.predict(fp, data, dtype=jnp.float64), data):
        assert e == pytest.approx(d.energy, abs=1e-9)
        np.testing.assert_allclose(f, d.forces, atol=1e-9)
        np.testing.assert_allclose(s, d.stress, atol=1e-11)


def test_fit_recovers_known_parameters(x64):
    """Exact inverse: labels from a known potential, a fit from a perturbed start."""
    truth = known_potential()
    structures = [triclinic_nacl(s) for s in range(3)]
    structures += [rocksalt(a, 0.05, s) for s, a in enumerate((5.3, 5.9))]
    data = _labels(truth, structures)
    start = fitted.FittedPotential(
        params=fitted.ElementParams(
            **{k: np.array(getattr(truth.params, k)) for k in fitted.PARAM_NAMES}
        ),
        e0=truth.e0 + 0.3,
        fitted=truth.fitted,
    )
    start.params.radius[[NA, CL]] *= [1.1, 0.92]
    start.params.morse_depth[[NA, CL]] *= [0.7, 1.3]
    start.params.charge[[NA, CL]] = [0.6, -0.9]
    settings = fit.FitSettings(prior=0.0, steps=100,
                               trainable=("radius", "morse_depth", "charge", "e0"))  # fmt: skip
    got, history = fit.fit(data, settings, init=start, progress=False, dtype=jnp.float64)
    assert history[-1] < 1e-10 * history[0]
    for k in ("radius", "morse_depth", "charge"):
        np.testing.assert_allclose(
            getattr(got.params, k)[[NA, CL]],
            getattr(truth.params, k)[[NA, CL]],
            rtol=1e-4,
            err_msg=k,
        )
    np.testing.assert_allclose(got.e0[[NA, CL]], truth.e0[[NA, CL]], atol=1e-4)
    # elements absent from the data keep their start values and are not marked fitted
    assert got.params.radius[TI] == start.params.radius[TI] and not got.fitted[TI]


@pytest.mark.slow  # ~30 s: CHGNet loads and labels, the fit compiles
def test_fit_potential_command_end_to_end(tmp_path):
    """A handful of Perov-5 crystals labelled by CHGNet, fitted, written, reloaded."""
    pytest.importorskip("chgnet")
    from ase.io import write

    from autoperi_jax.cli import main

    src = tmp_path / "few.extxyz"
    write(src, perov_atoms(3))
    out = tmp_path / "pot.json"
    cache = tmp_path / "labels.jsonl"
    argv = ["fit-potential", "--structures", str(src), "--n", "3", "--rattled", "1",
            "--strained", "1", "--holdout", "0.34", "--steps", "5", "--out", str(out),
            "--cache", str(cache), "--quiet", "--seed", "1"]  # fmt: skip
    assert main(argv) == 0
    fp = fitted.load_fitted(out)
    meta = fp.meta
    assert meta["data"]["labelled"] == 9 and meta["data"]["label_failures"] == 0
    assert meta["data"]["fit_structures"] + meta["data"]["held_out_structures"] == 9
    assert np.isfinite(meta["errors_fit"]["force_mae"])
    assert len(cache.read_text().splitlines()) == 9
    assert main(argv) == 0  # a rerun takes every label from the cache
    assert len(cache.read_text().splitlines()) == 9
