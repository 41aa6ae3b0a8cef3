"""Supercell-free phonons against phonopy finite displacements and exact invariances."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from scipy.optimize import minimize_scalar
from test_physics_potentials import perov_atoms

from autoperi_jax import physics

COMMENSURATE_Q = np.array(
    [[0, 0, 0], [0.5, 0, 0], [0, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0.5, 0.5], [-0.5, 0, 0.5]]
)
GENERAL_Q = np.array([[0.1, 0.2, 0.3], [0.25, -0.1, 0.4], [0.5, 0.25, 0.0], [0.0, 0.0, 0.05]])


def relaxed(structures: list[Atoms], potential, n_images) -> list[Atoms]:
    """Positions relaxed with the jitted FIRE (fixed cells), as new ``Atoms``."""
    from test_physics_potentials import padded_batch

    batch = padded_batch(structures)
    res = physics.batch_relax(*batch, potential=potential, n_images=n_images, n_steps=3000,
                              fmax=1e-4, early_exit=True)  # fmt: skip
    assert bool(jnp.all(res.converged))
    out = []
    for b, a in enumerate(structures):
        out.append(Atoms(numbers=a.numbers, cell=a.cell[:],
                         scaled_positions=np.asarray(res.frac[b, : len(a)]), pbc=True))  # fmt: skip
    return out


def compare_with_phonopy(atoms: Atoms, potential, supercell, qpoints, rtol=1e-3):
    ph = physics.phonopy_from_atoms(atoms, physics.NumpyPairCalculator(potential), supercell)
    cell = jnp.asarray(atoms.cell[:])
    frac = jnp.asarray(atoms.get_scaled_positions(wrap=True))
    z = jnp.asarray(atoms.numbers)
    masses = jnp.asarray(atoms.get_masses())
    ni = physics.n_images_for_cutoff(atoms.cell[:], potential.cutoff)
    res = physics.phonon_frequencies(cell, frac, z, None, qpoints, potential=potential,
                                     n_images=ni, masses=masses)  # fmt: skip
    dmat = physics.dynamical_matrices(cell, frac, z, None, qpoints, potential=potential,
                                      n_images=ni, masses=masses,
                                      phase_convention="positions")  # fmt: skip
    for k, q in enumerate(qpoints):
        f_ref = np.sort(ph.get_frequencies(q))
        f = np.asarray(res.frequencies[k])
        scale = np.abs(f_ref).max()
        np.testing.assert_allclose(f, f_ref, rtol=0, atol=rtol * scale, err_msg=f"q={q}")
        # phonopy's phase convention exp(2 pi i q.(R + f_j - f_i)): equal matrices, not just
        # equal spectra (the lattice convention differs by a unitary diagonal phase)
        d_ref = ph.get_dynamical_matrix_at_q(q)
        d = np.asarray(dmat[k])
        np.testing.assert_allclose(d, d_ref, rtol=0, atol=rtol * np.abs(d_ref).max())


def test_matches_phonopy_commensurate_q(x64):
    """Two relaxed Perov-5 crystals; q-points commensurate with the 2x2x2 supercell are exact."""
    pot = physics.uff_lennard_jones(cutoff=5.0)
    structures = relaxed(perov_atoms(2), pot, (2, 2, 2))
    for atoms in structures:
        compare_with_phonopy(atoms, pot, (2, 2, 2), COMMENSURATE_Q)


@pytest.mark.slow
def test_matches_phonopy_five_structures_general_q(x64):
    """Five relaxed Perov-5 crystals at general q: supercell heights > 2 cutoff + margin."""
    pot = physics.uff_lennard_jones(cutoff=4.5)
    structures = relaxed(perov_atoms(5), pot, (2, 2, 2))
    for atoms in structures:
        heights = 1.0 / np.linalg.norm(np.linalg.inv(atoms.cell[:]).T, axis=1)
        supercell = tuple(int(np.ceil((2 * pot.cutoff + 0.5) / h)) for h in heights)
        compare_with_phonopy(atoms, pot, supercell, np.concatenate([COMMENSURATE_Q, GENERAL_Q]))


def _perturbed_perov(seed=0):
    atoms = perov_atoms(1)[0]
    rng = np.random.default_rng(seed)
    frac = atoms.get_scaled_positions() + 0.01 * rng.normal(size=(len(atoms), 3))
    return jnp.asarray(atoms.cell[:]), jnp.asarray(frac), jnp.asarray(atoms.numbers)


def test_acoustic_sum_rule_hermitian_and_autodiff_hessian(x64):
    """D(Gamma) sqrt(m m) equals the autodiff Hessian of E; translations are null vectors."""
    pot = physics.uff_morse(cutoff=5.0)
    cell, frac, z = _perturbed_perov()
    ni = (2, 2, 2)
    m = jnp.asarray(physics.elements.ATOMIC_MASS)[z]
    q = jnp.asarray(np.concatenate([COMMENSURATE_Q, GENERAL_Q]))
    dmat = np.asarray(physics.dynamical_matrices(cell, frac, z, None, q, potential=pot,
                                                 n_images=ni))  # fmt: skip
    np.testing.assert_allclose(dmat, np.conj(np.swapaxes(dmat, -1, -2)), atol=1e-12)
    n = frac.shape[0]
    sqrt_m = np.repeat(np.sqrt(np.asarray(m)), 3)
    phi_gamma = dmat[0].real * np.outer(sqrt_m, sqrt_m)  # sum_R Phi(0i, Rj)

    def e_cart(x):
        return physics.energy(cell, x @ jnp.linalg.inv(cell), z, potential=pot, n_images=ni)

    hess = np.asarray(jax.hessian(e_cart)(frac @ cell)).reshape(3 * n, 3 * n)
    np.testing.assert_allclose(phi_gamma, hess, atol=1e-8 * np.abs(hess).max())
    np.testing.assert_allclose(hess, hess.T, atol=1e-10 * np.abs(hess).max())
    trans = np.tile(np.eye(3), (n, 1))  # [3N, 3] uniform translations
    np.testing.assert_allclose(hess @ trans, 0.0, atol=1e-10 * np.abs(hess).max())


def test_commensurate_q_equals_supercell_hessian(x64):
    """Eigenvalues of D at q in {0, 1/2}^2 x {0} equal those of the 2x2x1 supercell's Hessian."""
    pot = physics.uff_lennard_jones(cutoff=5.0)
    cell, frac, z = _perturbed_perov(1)
    n = frac.shape[0]
    shifts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]])
    reps = np.array([2.0, 2.0, 1.0])
    sc_cell = cell * jnp.asarray(reps)[:, None]
    sc_frac = ((frac[None, :, :] + shifts[:, None, :]) / reps).reshape(-1, 3)
    sc_z = jnp.tile(z, 4)
    m = np.repeat(np.asarray(physics.elements.ATOMIC_MASS)[np.asarray(sc_z)], 3)

    def e_cart(x):
        return physics.energy(sc_cell, x @ jnp.linalg.inv(sc_cell), sc_z, potential=pot,
                              n_images=(1, 1, 2))  # fmt: skip

    hess = jax.jit(jax.hessian(e_cart))(sc_frac @ sc_cell)
    hess = np.asarray(hess).reshape(12 * n, 12 * n)
    eig_sc = np.sort(np.linalg.eigvalsh(hess / np.sqrt(np.outer(m, m))))
    qs = shifts / 2.0
    res = physics.phonon_frequencies(cell, frac, z, None, jnp.asarray(qs), potential=pot,
                                     n_images=(2, 2, 2))  # fmt: skip
    eig = np.sort(np.asarray(res.omega2).ravel()) / physics.VASP_TO_THZ**2
    np.testing.assert_allclose(eig, eig_sc, atol=1e-8 * np.abs(eig_sc).max())


def test_frequencies_invariant_rotation_translation_wrap_padding(x64):
    pot = physics.uff_lennard_jones(cutoff=5.0)
    cell, frac, z = _perturbed_perov(2)
    q = jnp.asarray(np.concatenate([COMMENSURATE_Q, GENERAL_Q]))
    ni = (2, 2, 2)

    def w2(c, f, zz, mask=None):
        return np.asarray(physics.phonon_frequencies(c, f, zz, mask, q, potential=pot,
                                                     n_images=ni).omega2)  # fmt: skip

    ref = w2(cell, frac, z)
    scale = np.abs(ref).max()
    rot, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    rot = rot * np.sign(np.linalg.det(rot))
    np.testing.assert_allclose(w2(cell @ jnp.asarray(rot.T), frac, z), ref, atol=1e-9 * scale)
    np.testing.assert_allclose(w2(cell, frac + 0.37, z), ref, atol=1e-9 * scale)
    wrap = jnp.asarray([[1, 0, 0], [0, -1, 2], [0, 0, 0], [3, 0, 0], [0, 1, 1]])
    np.testing.assert_allclose(w2(cell, frac + wrap, z), ref, atol=1e-9 * scale)
    perm = jnp.asarray([4, 2, 0, 1, 3])
    np.testing.assert_allclose(w2(cell, frac[perm], z[perm]), ref, atol=1e-9 * scale)
    # two padded atoms: the real spectrum is unchanged and comes first
    fp = jnp.concatenate([frac, jnp.zeros((2, 3))])
    zp = jnp.concatenate([z, jnp.zeros(2, int)])
    mask = jnp.arange(7) < 5
    res = physics.phonon_frequencies(cell, fp, zp, mask, q, potential=pot, n_images=ni)
    assert int(jnp.sum(res.mode_mask)) == 15
    np.testing.assert_allclose(np.asarray(res.omega2)[:, :15], ref, atol=1e-9 * scale)
    w_min = physics.min_omega2(cell, fp, zp, mask, q, potential=pot, n_images=ni)
    w_min_ref = physics.min_omega2(cell, frac, z, None, q, potential=pot, n_images=ni)
    assert float(w_min) == pytest.approx(float(w_min_ref), rel=1e-9)


def _cubic_lj_minimum(prim: np.ndarray, pot) -> float:
    def e(a):
        return float(physics.energy(jnp.asarray(prim * a), jnp.zeros((1, 3)), jnp.array([18]),
                                    potential=pot, n_images=(6, 6, 6)))  # fmt: skip

    return float(minimize_scalar(e, bounds=(3.0, 8.0), method="bounded",
                                 options={"xatol": 1e-9}).x)  # fmt: skip


def test_fcc_lj_stable_and_simple_cubic_lj_unstable(x64):
    """fcc LJ (Ar-like) at its minimum: no imaginary mode; simple cubic LJ: imaginary at M."""
    pot = physics.make_pair_potential(3.4, 0.0104, kind="lj", cutoff=8.5, onset=7.0)
    q = jnp.asarray(physics.monkhorst_pack((4, 4, 4), gamma_centered=True))
    fcc = 0.5 * (np.ones((3, 3)) - np.eye(3))
    out = {}
    for name, prim in [("fcc", fcc), ("sc", np.eye(3))]:
        a0 = _cubic_lj_minimum(prim, pot)
        cell = jnp.asarray(prim * a0)
        args = (cell, jnp.zeros((1, 3)), jnp.array([18]), None, q)
        res = physics.phonon_frequencies(*args, potential=pot, n_images=(3, 3, 3))
        loss = physics.stability_loss(*args, potential=pot, n_images=(3, 3, 3))
        s = physics.stress(cell, jnp.zeros((1, 3)), jnp.array([18]), potential=pot,
                           n_images=(3, 3, 3))  # fmt: skip
        assert np.abs(np.asarray(s)).max() < 1e-8  # at the minimum lattice constant
        out[name] = (np.asarray(res.omega2), float(loss))
    w2_fcc, loss_fcc = out["fcc"]
    assert loss_fcc == 0.0
    assert w2_fcc.min() > -1e-6 * w2_fcc.max()  # only the acoustic zeros at Gamma
    assert np.sum(np.abs(w2_fcc) < 1e-6 * w2_fcc.max()) == 3
    w2_sc, loss_sc = out["sc"]
    assert loss_sc > 0.1  # THz^2
    assert w2_sc.min() == pytest.approx(-loss_sc, rel=1e-9)
    assert np.any(np.asarray(q)[np.argmin(w2_sc.min(axis=1))] != 0)  # off-Gamma instability


def test_gamma_optical_instability_is_not_masked(x64):
    """An unstable optical mode at Gamma counts; only the 3 acoustic modes are excluded."""
    pot = physics.uff_lennard_jones(cutoff=5.0)
    cell, frac, z = _perturbed_perov(3)
    gamma = jnp.zeros((1, 3))
    res = physics.phonon_frequencies(cell, frac, z, None, gamma, potential=pot, n_images=(2, 2, 2))
    w2 = np.sort(np.asarray(res.omega2[0]))
    acoustic = np.argsort(np.abs(w2))[:3]
    optical = np.delete(w2, acoustic)
    assert optical.min() < -1.0  # this UFF perovskite is unstable at Gamma
    w_min = physics.min_omega2(cell, frac, z, None, gamma, potential=pot, n_images=(2, 2, 2))
    assert float(w_min) == pytest.approx(optical.min(), rel=1e-9)
