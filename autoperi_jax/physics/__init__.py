"""Differentiable crystal physics with jax-md: pair energies, relaxation, phonons, chemistry.

Pure functions of ``(cell, frac, numbers, atom_mask)`` that are jittable, differentiable in the
cell and the fractional coordinates, and ``vmap``-able over padded batches. Conventions:

* ``cell`` ``[3, 3]``: ROWS are the lattice vectors [A] (ASE); ``cart = frac @ cell``.
* Edge vectors ``r_ij^k = (frac_j + k - frac_i) @ cell`` over a static stencil of integer image
  shifts ``k`` (``n_images``, a static tuple; never the minimum image: cells are often smaller
  than the cutoff). ``n_images_for_cutoff`` computes it on the host.
* Units: energy eV, length A, force eV/A, stress eV/A^3 (ASE sign), mass amu, frequency THz
  (ordinary frequency, phonopy convention; negative = imaginary), ``omega^2`` THz^2.
* Padded batches: ``cell [B, 3, 3]``, ``frac [B, N, 3]``, ``numbers [B, N]``,
  ``atom_mask [B, N]`` bool; padded atoms never interact.

Main entry points:

* Potentials: ``uff_lennard_jones``, ``uff_morse``, ``make_pair_potential``,
  ``covalent_soft_sphere``; ``energy``, ``atomic_energies``, ``energy_forces_stress``,
  ``forces``, ``stress``, ``batch_energy``, ``batch_energy_forces_stress``.
* Relaxation: ``relax``, ``batch_relax`` (jax-md FIRE, optional cell), and the sampler's
  constraint layer ``repulsive_constraint`` (batched on neighbour lists:
  ``batched_repulsive_constraint``; + ``min_distance``, ``min_distance_ratio``, and
  ``batched_min_distance_ratio`` on a neighbour list).
* Phonons: ``force_constant_blocks``, ``dynamical_matrices``, ``phonon_frequencies``,
  ``min_omega2``, ``stability_loss``, ``monkhorst_pack``, ``gamma_and_mp_grid``.
* Chemistry: ``coordination_numbers``, ``ionic_roles``, ``chem_loss``, ``ideal_cn_table``,
  ``ideal_cn_from_table``; ``composition_valid`` (jitted SMACT charge-neutrality rule).
* Losses: ``physics_losses``, ``l_phys``, ``batch_physics_losses``; the training loss's
  batched term ``make_objective_fn`` with its typed settings ``PhysicsObjective``.
* Reference (NumPy/ASE, host): ``NumpyPairCalculator``, ``phonopy_from_atoms``.
"""

from autoperi_jax.physics.chemistry import (
    Coordination,
    chem_loss,
    coordination_numbers,
    ideal_cn_from_table,
    ideal_cn_table,
    ionic_roles,
)
from autoperi_jax.physics.composition import composition_valid
from autoperi_jax.physics.images import (
    cell_heights,
    dense_pairs,
    image_shifts,
    images_cover_cutoff,
    n_images_for_cutoff,
    wrap_frac,
)
from autoperi_jax.physics.losses import (
    DEFAULT_QPOINTS,
    batch_physics_losses,
    l_phys,
    physics_losses,
)
from autoperi_jax.physics.objective import PhysicsObjective, make_objective_fn
from autoperi_jax.physics.phonons import (
    VASP_TO_THZ,
    PhononResult,
    dynamical_matrices,
    force_constant_blocks,
    gamma_and_mp_grid,
    min_omega2,
    monkhorst_pack,
    phonon_frequencies,
    stability_loss,
)
from autoperi_jax.physics.potentials import (
    PairPotential,
    atomic_energies,
    batch_energy,
    batch_energy_forces_stress,
    cell_volume,
    covalent_soft_sphere,
    energy,
    energy_forces_stress,
    forces,
    make_pair_potential,
    pair_energy,
    smooth_switch,
    stress,
    uff_lennard_jones,
    uff_morse,
)
from autoperi_jax.physics.reference import NumpyPairCalculator, phonopy_from_atoms
from autoperi_jax.physics.relax import (
    RelaxResult,
    batch_relax,
    batched_min_distance_ratio,
    batched_repulsive_constraint,
    min_distance,
    min_distance_ratio,
    relax,
    repulsive_constraint,
)

__all__ = [
    "DEFAULT_QPOINTS",
    "VASP_TO_THZ",
    "Coordination",
    "NumpyPairCalculator",
    "PairPotential",
    "PhononResult",
    "PhysicsObjective",
    "RelaxResult",
    "atomic_energies",
    "batch_energy",
    "batch_energy_forces_stress",
    "batch_physics_losses",
    "batch_relax",
    "batched_min_distance_ratio",
    "batched_repulsive_constraint",
    "cell_heights",
    "cell_volume",
    "chem_loss",
    "composition_valid",
    "coordination_numbers",
    "covalent_soft_sphere",
    "dense_pairs",
    "dynamical_matrices",
    "energy",
    "energy_forces_stress",
    "force_constant_blocks",
    "forces",
    "gamma_and_mp_grid",
    "ideal_cn_from_table",
    "ideal_cn_table",
    "image_shifts",
    "images_cover_cutoff",
    "ionic_roles",
    "l_phys",
    "make_objective_fn",
    "make_pair_potential",
    "min_distance",
    "min_distance_ratio",
    "min_omega2",
    "monkhorst_pack",
    "n_images_for_cutoff",
    "pair_energy",
    "phonon_frequencies",
    "phonopy_from_atoms",
    "physics_losses",
    "relax",
    "repulsive_constraint",
    "smooth_switch",
    "stability_loss",
    "stress",
    "uff_lennard_jones",
    "uff_morse",
    "wrap_frac",
]
