r"""Physics losses of METHOD section 2.5: ``L_phys = L_energy + L_stability + L_chem``.

* ``L_energy = E / n_atoms - e_ref`` [eV/atom]: pair energy per atom (``potentials``), minus an
  optional per-structure reference (e.g. the reference crystal's energy per atom).
* ``L_stability = max(0, -min_q omega^2)`` [THz^2] over a q-point set, acoustic modes at Gamma
  excluded (``phonons.stability_loss``).
* ``L_chem = mean_i |C_i - C_i^ideal| + w_en mean_i W_i`` (``chemistry.chem_loss``).

All functions are pure, jittable, differentiable in ``cell`` and ``frac`` and ``vmap``-able;
``batch_physics_losses`` maps over padded batches (``cell [B, 3, 3]``, ``frac [B, N, 3]``,
``numbers [B, N]``, ``atom_mask [B, N]``). The three terms have different units; the weights are
the caller's (the training loss uses ``beta * L_phys``).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from autoperi_jax.physics.chemistry import chem_loss
from autoperi_jax.physics.phonons import gamma_and_mp_grid, stability_loss
from autoperi_jax.physics.potentials import PairPotential, energy

Array = jax.Array

# Gamma + the 2x2x2 Monkhorst-Pack grid: 9 q-points, cheap enough for a training step.
DEFAULT_QPOINTS: np.ndarray = gamma_and_mp_grid((2, 2, 2))


@partial(jax.jit, static_argnames=("n_images",))
def physics_losses(
    cell: Array,  # [3, 3]
    frac: Array,  # [N, 3]
    numbers: Array,  # [N] int
    atom_mask: Array | None = None,  # [N] bool
    *,
    potential: PairPotential,
    n_images: tuple[int, int, int],
    qpoints: Array | None = None,  # [Q, 3]
    ideal_cn: Array | None = None,  # [N]
    energy_ref: Array | None = None,
    chem_cutoff: float = 6.0,
    en_weight: float = 1.0,
    stability_tolerance: float = 0.0,
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> dict[str, Array]:
    """The three physics losses of one (padded) structure and their weighted sum.

    Args:
        cell: ``[3, 3]`` rows are lattice vectors [A].
        frac: ``[N, 3]`` fractional coordinates.
        numbers: ``[N]`` atomic numbers.
        atom_mask: ``[N]`` bool or None.
        potential: ``PairPotential`` for ``L_energy`` and the phonons.
        n_images: Static image stencil covering ``max(potential.cutoff, chem_cutoff)``.
        qpoints: ``[Q, 3]`` reduced q-points; default ``DEFAULT_QPOINTS`` (Gamma + 2x2x2 MP).
        ideal_cn: ``[N]`` target coordination (negative: none) or None.
        energy_ref: Scalar reference energy per atom [eV/atom] or None.
        chem_cutoff: Cutoff of the coordination numbers [A].
        en_weight: Weight of the wrong-sign neighbour term inside ``L_chem``.
        stability_tolerance: ``omega^2`` [THz^2] treated as zero.
        weights: ``(w_energy, w_stability, w_chem)`` for ``total``.

    Returns:
        Dict of scalars: ``energy`` [eV/atom], ``stability`` [THz^2], ``chem``, ``total``.
    """
    mask = jnp.ones(numbers.shape, dtype=bool) if atom_mask is None else atom_mask
    q = jnp.asarray(DEFAULT_QPOINTS if qpoints is None else qpoints, dtype=frac.dtype)
    n = jnp.maximum(jnp.sum(mask), 1).astype(frac.dtype)
    l_energy = energy(cell, frac, numbers, mask, potential=potential, n_images=n_images) / n
    if energy_ref is not None:
        l_energy = l_energy - energy_ref
    l_stab = stability_loss(
        cell, frac, numbers, mask, q, potential=potential, n_images=n_images,
        tolerance=stability_tolerance,
    )  # fmt: skip
    l_chem = chem_loss(
        cell, frac, numbers, mask, ideal_cn, n_images=n_images, cutoff=chem_cutoff,
        en_weight=en_weight,
    )  # fmt: skip
    w_e, w_s, w_c = weights
    total = w_e * l_energy + w_s * l_stab + w_c * l_chem
    return {"energy": l_energy, "stability": l_stab, "chem": l_chem, "total": total}


def l_phys(
    cell: Array,
    frac: Array,
    numbers: Array,
    atom_mask: Array | None = None,
    **kwargs,
) -> Array:
    """``L_phys = w_e L_energy + w_s L_stability + w_c L_chem`` of one structure (scalar).

    Args:
        cell: ``[3, 3]`` [A].
        frac: ``[N, 3]``.
        numbers: ``[N]``.
        atom_mask: ``[N]`` bool or None.
        **kwargs: Keyword arguments of ``physics_losses`` (``potential`` and ``n_images``
            are required).

    Returns:
        Scalar ``total`` of ``physics_losses``.
    """
    return physics_losses(cell, frac, numbers, atom_mask, **kwargs)["total"]


def batch_physics_losses(
    cell: Array,  # [B, 3, 3]
    frac: Array,  # [B, N, 3]
    numbers: Array,  # [B, N]
    atom_mask: Array,  # [B, N] bool
    *,
    ideal_cn: Array | None = None,  # [B, N]
    energy_ref: Array | None = None,  # [B]
    **kwargs,
) -> dict[str, Array]:
    """``physics_losses`` over a padded batch: a dict of ``[B]`` arrays.

    Args:
        cell: ``[B, 3, 3]`` [A].
        frac: ``[B, N, 3]``.
        numbers: ``[B, N]``.
        atom_mask: ``[B, N]`` bool.
        ideal_cn: ``[B, N]`` targets or None.
        energy_ref: ``[B]`` reference energies per atom [eV/atom] or None.
        **kwargs: Shared keyword arguments of ``physics_losses``.

    Returns:
        Dict with ``energy``, ``stability``, ``chem``, ``total``, each ``[B]``; mask padded
        structures (e.g. jraph's padding graph) before averaging.
    """

    def one(c, f, z, m, cn, e_ref):
        return physics_losses(c, f, z, m, ideal_cn=cn, energy_ref=e_ref, **kwargs)

    in_axes = (0, 0, 0, 0, None if ideal_cn is None else 0, None if energy_ref is None else 0)
    return jax.vmap(one, in_axes=in_axes)(cell, frac, numbers, atom_mask, ideal_cn, energy_ref)
