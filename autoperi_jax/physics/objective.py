r"""The physics term of the training loss, ``L_phys``, on padded batches of decoded crystals.

``L_phys = w_energy L_energy + w_stability L_stability + w_chem L_chem`` per structure
(METHOD section 2.5; the terms are those of `autoperi_jax.physics.losses`):

* ``L_energy = (E(x) - E(x_ref)) / n_atoms`` [eV/atom] with ``energy_reference``, else
  ``E(x) / n_atoms``: the excess pair energy of the decoded structure over the true one;
* ``L_stability = max(0, tol - min_q omega^2)`` [THz^2] over ``qpoints``
  (`autoperi_jax.physics.stability_loss`);
* ``L_chem`` = coordination mismatch + electronegativity term
  (`autoperi_jax.physics.chem_loss`), against the true structure's coordination numbers
  with ``chem_reference``.

`PhysicsObjective` holds the typed settings, `make_objective_fn` returns the pure,
jittable, differentiable ``phys_fn`` that `autoperi_jax.loss.make_loss_fn` takes (the
trainer builds the settings from ``config.physics``); research code can differentiate it
directly::

    obj = PhysicsObjective(potential=uff_morse(cutoff=6.0), n_images=(2, 2, 2),
                           qpoints=gamma_and_mp_grid((1, 1, 1)))
    phys_fn = make_objective_fn(obj)
    grad = jax.grad(lambda f: phys_fn(cell, f, numbers, mask, ref)["total"].sum())(frac)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from autoperi_jax.physics.chemistry import chem_loss, coordination_numbers
from autoperi_jax.physics.phonons import stability_loss
from autoperi_jax.physics.potentials import PairPotential, energy

__all__ = ["PhysicsObjective", "make_objective_fn"]

Array = jax.Array


class PhysicsObjective(NamedTuple):
    """Typed settings of ``L_phys``.

    Attributes:
      potential: the pair potential of the energy and phonon terms (e.g. `uff_morse`).
      n_images: static image stencil covering ``max(potential.cutoff, chem_cutoff)`` for
        the smallest cell height the loss will see (`n_images_for_cutoff`).
      qpoints: [Q, 3] fractional q-points of the stability term (`gamma_and_mp_grid`).
      weights: (w_energy, w_stability, w_chem); a zero weight skips that term entirely
        (no phonon eigenproblem is traced when ``w_stability == 0``).
      chem_cutoff: [A] cutoff of the coordination numbers.
      en_weight: weight of the electronegativity part of ``L_chem``.
      stability_tolerance: [THz^2] ``tol`` of ``L_stability``.
      energy_reference: subtract the reference structure's energy per atom.
      chem_reference: target coordination numbers = those of the reference structure
        (else the ideal-CN table of `chem_loss`).
    """

    potential: PairPotential
    n_images: tuple[int, int, int]
    qpoints: np.ndarray | Array  # [Q, 3]
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    chem_cutoff: float = 4.0
    en_weight: float = 1.0
    stability_tolerance: float = 0.0
    energy_reference: bool = True
    chem_reference: bool = True


PhysFn = Callable[[Array, Array, Array, Array, Array], dict[str, Array]]


def make_objective_fn(objective: PhysicsObjective) -> PhysFn:
    """The batched ``L_phys`` of ``objective``: a pure function, jit- and grad-able.

    Args:
      objective: the settings (`PhysicsObjective`).

    Returns:
      ``phys_fn(cell [G, 3, 3], frac [G, A, 3], numbers [G, A], mask [G, A] bool,
      ref_frac [G, A, 3]) -> {"total", "energy", "stability", "chem"}``, each [G] (per
      structure; 0 for padding graphs, with finite zero gradients). ``ref_frac`` is the
      true structure on the same cell (held constant: ``stop_gradient``).
    """
    pot, n_images = objective.potential, tuple(objective.n_images)
    w_e, w_s, w_c = (float(w) for w in objective.weights)
    qpoints = jnp.asarray(objective.qpoints, jnp.float32)  # [Q, 3]
    chem_cutoff = objective.chem_cutoff

    def one(cell, frac, numbers, mask, ref):
        n = jnp.maximum(jnp.sum(mask), 1).astype(frac.dtype)
        zero = jnp.zeros((), frac.dtype)
        out = {"energy": zero, "stability": zero, "chem": zero}
        if w_e:
            e = energy(cell, frac, numbers, mask, potential=pot, n_images=n_images)
            if objective.energy_reference:
                e = e - energy(cell, ref, numbers, mask, potential=pot, n_images=n_images)
            out["energy"] = e / n
        if w_s:
            out["stability"] = stability_loss(
                cell, frac, numbers, mask, qpoints, potential=pot, n_images=n_images,
                tolerance=objective.stability_tolerance,
            )  # fmt: skip
        if w_c:
            ideal = None
            if objective.chem_reference:
                ideal = coordination_numbers(
                    cell, ref, numbers, mask, n_images=n_images, cutoff=chem_cutoff
                ).cn
            out["chem"] = chem_loss(
                cell, frac, numbers, mask, ideal, n_images=n_images, cutoff=chem_cutoff,
                en_weight=objective.en_weight,
            )  # fmt: skip
        out["total"] = w_e * out["energy"] + w_s * out["stability"] + w_c * out["chem"]
        return out

    def safe_one(cell, frac, numbers, mask, ref):
        # Padding graphs have no atoms (the phonon term is NaN there): evaluate a lone H
        # atom in a 10 A cell instead and return zeros (double-where: finite gradients).
        has = jnp.any(mask)
        first = jnp.arange(mask.shape[0]) == 0
        out = one(
            jnp.where(has, cell, 10.0 * jnp.eye(3, dtype=cell.dtype)),
            frac,
            jnp.where(has, numbers, first.astype(numbers.dtype)),
            jnp.where(has, mask, first),
            ref,
        )
        return {k: jnp.where(has, v, 0.0) for k, v in out.items()}

    def phys_fn(cell, frac, numbers, mask, ref_frac):
        ref = jax.lax.stop_gradient(ref_frac)
        return jax.vmap(safe_one)(cell, frac, numbers, mask, ref)

    return phys_fn
