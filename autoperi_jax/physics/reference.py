"""A NumPy/ASE reference implementation of ``PairPotential`` (no JAX, analytic derivatives).

``NumpyPairCalculator`` is an ``ase.calculators.calculator.Calculator`` that evaluates the same
pair potential as ``potentials.energy`` with an independent code path: ASE's neighbour list over
all periodic images (``ase.neighborlist.neighbor_list``), closed-form ``V'(r)`` and the virial
``sigma = 1/(2V) sum_ij V'(r) / r * d_ij (x) d_ij``. It lets ASE tools (phonopy through ASE,
ASE optimisers and MD) run with the potential, and the tests use it as independent truth.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from ase.calculators.calculator import Calculator, all_changes
from ase.neighborlist import neighbor_list
from ase.stress import full_3x3_to_voigt_6_stress

from autoperi_jax.physics.potentials import COULOMB_K, PairPotential


def _pair_v_dv(kind: str, r, s, e, a, extra=None, damping=(0.2, 2.0)):
    """Pair energy and its radial derivative in closed form (no cutoff treatment)."""
    if kind == "born_morse_coulomb":
        from scipy.special import erf

        born_a, rho, qq = extra
        ca, cb = damping
        ex = np.exp(-a * (r - s))
        bm = born_a * np.exp(-r / rho)
        g = (erf(cb * r) - erf(ca * r)) / r
        dg = (
            2 / np.sqrt(np.pi) * (cb * np.exp(-((cb * r) ** 2)) - ca * np.exp(-((ca * r) ** 2))) - g
        ) / r
        v = bm + e * ((1 - ex) ** 2 - 1) + COULOMB_K * qq * g
        return v, -bm / rho + 2 * e * a * (1 - ex) * ex + COULOMB_K * qq * dg
    if kind == "lj":
        x6 = (s / r) ** 6
        return 4 * e * (x6 * x6 - x6), 4 * e * (-12 * x6 * x6 + 6 * x6) / r
    if kind == "morse":
        ex = np.exp(-a * (r - s))
        return e * (1 - ex) ** 2 - e, 2 * e * a * (1 - ex) * ex
    if kind == "soft_sphere":
        inside = r < s
        base = np.where(inside, 1 - r / s, 0.0)
        v = np.where(inside, e / a * base**a, 0.0)
        dv = np.where(inside, -(e / s) * base ** (a - 1), 0.0)
        return v, dv
    raise ValueError(kind)


def pair_energy_and_derivative(potential: PairPotential, r, z_i, z_j):
    """NumPy ``V(r)`` [eV] and ``dV/dr`` [eV/A] including the cutoff treatment.

    Args:
        potential: ``PairPotential`` (its tables are read on the host).
        r: ``[P]`` distances [A].
        z_i: ``[P]`` atomic numbers.
        z_j: ``[P]`` atomic numbers.

    Returns:
        ``(v [P], dv_dr [P])``.
    """
    s = np.asarray(potential.sigma, dtype=np.float64)[z_i, z_j]
    e = np.asarray(potential.epsilon, dtype=np.float64)[z_i, z_j]
    a = np.asarray(potential.alpha, dtype=np.float64)[z_i, z_j]
    rc, ro = potential.cutoff, potential.onset
    extra = None
    if potential.extra is not None:
        extra = tuple(np.asarray(potential.extra[k], np.float64)[z_i, z_j] for k in range(3))
    v, dv = _pair_v_dv(potential.kind, r, s, e, a, extra, potential.damping)
    inside = r < rc
    if potential.cutoff_mode == "smooth":
        u, rc2, ro2 = r * r, rc * rc, ro * ro
        den = (rc2 - ro2) ** 3
        sw = np.where(
            r < ro, 1.0, np.where(inside, (rc2 - u) ** 2 * (rc2 + 2 * u - 3 * ro2) / den, 0)
        )
        dsw = np.where(r < ro, 0.0, np.where(inside, 6 * (rc2 - u) * (ro2 - u) / den * 2 * r, 0))
        return v * sw, dv * sw + v * dsw
    if potential.cutoff_mode == "shift":
        v_rc, _ = _pair_v_dv(potential.kind, np.full_like(r, rc), s, e, a, extra, potential.damping)
        return np.where(inside, v - v_rc, 0.0), np.where(inside, dv, 0.0)
    return np.where(inside, v, 0.0), np.where(inside, dv, 0.0)


class NumpyPairCalculator(Calculator):
    """ASE calculator for a ``PairPotential`` in plain NumPy (energy, forces, stress).

    Args:
        potential: The ``PairPotential`` to evaluate.
        **kwargs: Passed to ``ase.calculators.calculator.Calculator``.
    """

    implemented_properties: ClassVar[list[str]] = [
        "energy",
        "free_energy",
        "energies",
        "forces",
        "stress",
    ]

    def __init__(self, potential: PairPotential, **kwargs):
        super().__init__(**kwargs)
        self.potential = potential

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        pot = self.potential
        i, j, d_vec = neighbor_list("ijD", atoms, pot.cutoff, self_interaction=False)
        r = np.linalg.norm(d_vec, axis=1)
        z = atoms.numbers
        v, dv = pair_energy_and_derivative(pot, r, z[i], z[j])
        n = len(atoms)
        energies = 0.5 * np.bincount(i, weights=v, minlength=n)
        pair_f = (dv / r)[:, None] * d_vec  # dV/d(d_ij), pointing from i to j
        forces = np.zeros((n, 3))
        for a in range(3):
            forces[:, a] = np.bincount(i, weights=pair_f[:, a], minlength=n)
        virial = 0.5 * pair_f.T @ d_vec
        volume = atoms.get_volume()
        self.results["energy"] = float(energies.sum())
        self.results["free_energy"] = float(energies.sum())
        self.results["energies"] = energies
        self.results["forces"] = forces
        self.results["stress"] = full_3x3_to_voigt_6_stress(virial / volume)


def phonopy_from_atoms(
    atoms,
    calculator: Calculator,
    supercell: tuple[int, int, int],
    distance: float = 1e-3,
    is_plusminus: bool = True,
    symprec: float = 1e-5,
):
    """Finite-displacement force constants with phonopy and an ASE calculator (host, slow).

    The unit cell is its own primitive cell (``primitive_matrix="P"``); central differences
    (``is_plusminus``) with a small ``distance`` make the finite-difference error negligible.
    Requires phonopy (the ``eval``/``dev`` extra).

    Args:
        atoms: ``ase.Atoms`` unit cell (should be relaxed).
        calculator: ASE calculator used for the supercell forces.
        supercell: Diagonal supercell multiplicities. Force constants are exact at q-points
            commensurate with the supercell; at other q they are exact only if every
            perpendicular supercell height exceeds twice the cutoff.
        distance: Displacement amplitude [A].
        is_plusminus: Use + and - displacements.
        symprec: Symmetry tolerance for phonopy's displacement reduction.

    Returns:
        A ``phonopy.Phonopy`` object with force constants; masses are ``atoms``' masses.
    """
    from ase import Atoms
    from phonopy import Phonopy
    from phonopy.structure.atoms import PhonopyAtoms

    unit = PhonopyAtoms(
        symbols=atoms.get_chemical_symbols(),
        cell=np.asarray(atoms.cell[:]),
        scaled_positions=atoms.get_scaled_positions(wrap=True),
        masses=atoms.get_masses(),
    )
    ph = Phonopy(unit, supercell_matrix=np.diag(supercell), primitive_matrix="P", symprec=symprec)
    ph.generate_displacements(distance=distance, is_plusminus=is_plusminus)
    forces = []
    for sc in ph.supercells_with_displacements:
        sc_atoms = Atoms(
            numbers=sc.numbers, cell=sc.cell, scaled_positions=sc.scaled_positions, pbc=True
        )
        sc_atoms.calc = calculator
        forces.append(sc_atoms.get_forces())
    ph.forces = np.asarray(forces)
    ph.produce_force_constants()
    return ph
