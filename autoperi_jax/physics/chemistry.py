r"""Smooth coordination numbers and the chemical-validity loss ``L_chem`` (METHOD section 2.5).

``L_chem = mean_i |C_i - C_i^ideal| + w_en * mean_i W_i`` over the real atoms of a structure,
where ``C_i`` is a differentiable coordination number, ``C_i^ideal`` a target coordination and
``W_i`` a smooth penalty on "wrong-sign" neighbours. Everything is jittable and ``vmap``-able over
padded batches; only positions and the cell carry gradients (species are discrete).

Roles from electronegativity (Pauling ``chi``, ``elements.PAULING_CHI``):
    ``chi_bar`` is the mean ``chi`` of the structure's atoms. The structure is *polar* when
    ``max chi - min chi >= 0.4`` (Pauling's polar-bond threshold). In a polar structure atom
    ``i`` is a cation (role -1) if ``chi_i < chi_bar`` and an anion (role +1) if
    ``chi_i > chi_bar``; otherwise (non-polar structure, elements without ``chi``) role 0.

Coordination number (D3 form, Grimme, Antony, Ehrlich & Krieg, J. Chem. Phys. 132, 154104
(2010), eq. 15):

.. math::

    C_i = \sum_{j, k}{}^{'} \frac{S(r_{ij}^k)}{1 + \exp[-k_1 (k_2 R_{ij} / r_{ij}^k - 1)]},
    \qquad k_1 = 16,\ k_2 = 4/3,

summed over cation-anion pairs when both atoms have a role (heteropolar bonds, ``R_ij`` = sum
of Shannon crystal radii of the cation and the anion, ``elements.CATION_RADIUS`` /
``ANION_RADIUS``) and over all pairs involving a role-0 atom (``R_ij`` = sum of Cordero covalent
radii, as in D3 which uses covalent radii). ``S`` is the C^1 switch of ``potentials`` between
``cutoff - 1 A`` and ``cutoff`` so that the sum is finite. Like-role pairs (cation-cation,
anion-anion) do not count as bonds. Missing ionic radii fall back to covalent radii. Cubic
SrTiO3 gives ``C = 12 (Sr), 6 (Ti), 6 (O)``.

Wrong-sign neighbours (the electronegativity term): in a polar structure a neighbour of the
same role (the electronegativity difference does not have the cation-anion sign) closer than the
bond length is penalised,

.. math::

    W_i = \sum_{j,k:\ \mathrm{role}_i = \mathrm{role}_j \neq 0} h(r_{ij}^k / d_{ij}), \quad
    h(x) = \frac{\max(0, 1 - x)^2}{(1 - 0.75)^2}, \quad
    d_{ij} = \tfrac12 (b_i + b_j), \quad b_i = \rho_i + \bar\rho_{\mathrm{counter}(i)},

where ``b_i`` is the typical bond length of ``i`` (its ionic radius plus the mean radius of the
opposite-role atoms of the structure). ``h`` counts one for a like neighbour at 75 % of the bond
length, vanishes (C^1) at the bond length and keeps growing, with a gradient, for deeper
overlaps. Real crystals have like ions beyond the bond length (e.g. O-O = 2.76 A vs
``d = 2.3 A`` in SrTiO3), so ``W = 0`` there.

Ideal coordination ``C^ideal``: a per-atom target. Two documented sources are provided:

* the reference crystal (``coordination_numbers`` of the ground-truth structure), for
  reconstruction losses;
* an element table estimated from reference crystals (``ideal_cn_table``: per-element median of
  ``C_i`` over e.g. the training split, i.e. the most typical coordination of each element in
  that chemical space), gathered with ``ideal_cn_from_table``. Atoms with a negative target
  (elements absent from the table) get no coordination penalty.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from autoperi_jax.physics import elements
from autoperi_jax.physics.images import dense_pairs
from autoperi_jax.physics.potentials import smooth_switch

Array = jax.Array

POLAR_THRESHOLD = 0.4  # Pauling electronegativity spread above which roles are assigned
D3_K1 = 16.0
D3_K2 = 4.0 / 3.0


class Coordination(NamedTuple):
    """Smooth coordination analysis of one structure.

    Attributes:
        cn: ``[N]`` coordination numbers ``C_i`` (0 for padded atoms).
        wrong: ``[N]`` wrong-sign neighbour penalties ``W_i`` (same-role atoms inside the bond
            length).
        role: ``[N]`` int, -1 cation, +1 anion, 0 no role (non-polar or padded).
    """

    cn: Array
    wrong: Array
    role: Array


@jax.jit
def ionic_roles(numbers: Array, atom_mask: Array | None = None) -> Array:
    """Cation (-1) / anion (+1) / no role (0) from Pauling electronegativity.

    Args:
        numbers: ``[N]`` atomic numbers.
        atom_mask: ``[N]`` bool or None.

    Returns:
        ``[N]`` int32 roles (see module docstring).
    """
    if atom_mask is None:
        atom_mask = jnp.ones(numbers.shape, dtype=bool)
    chi_tab = jnp.asarray(np.nan_to_num(elements.PAULING_CHI, nan=0.0))
    has = jnp.asarray(elements.HAS_CHI)[numbers] & atom_mask
    chi = chi_tab[numbers]
    n = jnp.maximum(jnp.sum(has), 1)
    chi_bar = jnp.sum(jnp.where(has, chi, 0.0)) / n
    spread = jnp.max(jnp.where(has, chi, -jnp.inf)) - jnp.min(jnp.where(has, chi, jnp.inf))
    polar = spread >= POLAR_THRESHOLD
    role = jnp.sign(chi - chi_bar).astype(jnp.int32)
    return jnp.where(polar & has, role, 0)


def _overlap_penalty(x: Array, x_one: float = 0.75) -> Array:
    """``max(0, 1 - x)^2 / (1 - x_one)^2``: 1 at ``x_one``, 0 (C^1) from ``x = 1`` on."""
    return jnp.maximum(0.0, 1.0 - x) ** 2 / (1.0 - x_one) ** 2


@partial(jax.jit, static_argnames=("n_images",))
def coordination_numbers(
    cell: Array,  # [3, 3]
    frac: Array,  # [N, 3]
    numbers: Array,  # [N] int
    atom_mask: Array | None = None,  # [N] bool
    *,
    n_images: tuple[int, int, int],
    cutoff: float = 6.0,
) -> Coordination:
    """Smooth coordination numbers and wrong-sign neighbour counts (module docstring).

    Args:
        cell: ``[3, 3]`` rows are lattice vectors [A].
        frac: ``[N, 3]`` fractional coordinates.
        numbers: ``[N]`` atomic numbers.
        atom_mask: ``[N]`` bool or None.
        n_images: Static image stencil covering ``cutoff``.
        cutoff: Neighbour cutoff [A]; contributions are switched off between
            ``cutoff - 1`` and ``cutoff``.

    Returns:
        ``Coordination``.
    """
    dtype = frac.dtype
    mask = jnp.ones(numbers.shape, dtype=bool) if atom_mask is None else atom_mask
    pairs = dense_pairs(cell, frac, mask, n_images)
    role = ionic_roles(numbers, mask)
    r_cov = jnp.asarray(elements.COVALENT_RADIUS, dtype=dtype)[numbers]
    cat = jnp.asarray(elements.CATION_RADIUS, dtype=dtype)[numbers]
    an = jnp.asarray(elements.ANION_RADIUS, dtype=dtype)[numbers]
    r_ion = jnp.where(role < 0, cat, jnp.where(role > 0, an, jnp.nan))
    r_ion = jnp.where(jnp.isnan(r_ion), r_cov, r_ion)  # [N]

    ri, rj = role[:, None, None], role[None, :, None]
    hetero = ri * rj == -1
    like = ri * rj == 1
    neutral = (ri == 0) | (rj == 0)
    r0 = jnp.where(
        hetero,
        r_ion[:, None, None] + r_ion[None, :, None],
        r_cov[:, None, None] + r_cov[None, :, None],
    )
    r = pairs.dist
    switch = smooth_switch(r, cutoff - 1.0, cutoff)
    f = jax.nn.sigmoid(D3_K1 * (D3_K2 * r0 / r - 1.0)) * switch
    bonded = pairs.valid & (hetero | neutral)
    cn = jnp.sum(jnp.where(bonded, f, 0.0), axis=(1, 2))

    # typical bond length b_i = own radius + mean radius of the opposite-role atoms
    def mean_radius(sel):
        w = (sel & mask).astype(dtype)
        return jnp.sum(w * r_ion) / jnp.maximum(jnp.sum(w), 1.0)

    counter = jnp.where(role < 0, mean_radius(role > 0), mean_radius(role < 0))
    b = r_ion + counter
    d = 0.5 * (b[:, None, None] + b[None, :, None])
    g = _overlap_penalty(r / d)
    wrong = jnp.sum(jnp.where(pairs.valid & like, g, 0.0), axis=(1, 2))
    zero = jnp.zeros_like(cn)
    return Coordination(cn=jnp.where(mask, cn, zero), wrong=jnp.where(mask, wrong, zero), role=role)


def ideal_cn_from_table(table: Array, numbers: Array) -> Array:
    """Per-atom ideal coordination ``[N]`` gathered from a ``[119]`` element table (-1: none)."""
    return jnp.asarray(table)[numbers]


@partial(jax.jit, static_argnames=("n_images",))
def chem_loss(
    cell: Array,  # [3, 3]
    frac: Array,  # [N, 3]
    numbers: Array,  # [N] int
    atom_mask: Array | None,  # [N] bool
    ideal_cn: Array | None,  # [N]
    *,
    n_images: tuple[int, int, int],
    cutoff: float = 6.0,
    en_weight: float = 1.0,
) -> Array:
    """``L_chem = mean_i |C_i - C_i^ideal| + en_weight * mean_i W_i`` (dimensionless).

    Args:
        cell: ``[3, 3]`` rows are lattice vectors [A].
        frac: ``[N, 3]`` fractional coordinates.
        numbers: ``[N]`` atomic numbers.
        atom_mask: ``[N]`` bool or None.
        ideal_cn: ``[N]`` target coordination per atom (negative: no target), e.g.
            ``ideal_cn_from_table(table, numbers)`` or the reference crystal's ``cn``; None
            keeps only the electronegativity term.
        n_images: Static image stencil covering ``cutoff``.
        cutoff: Neighbour cutoff [A].
        en_weight: Weight of the wrong-sign neighbour term.

    Returns:
        Scalar loss (means over real atoms).
    """
    mask = jnp.ones(numbers.shape, dtype=bool) if atom_mask is None else atom_mask
    co = coordination_numbers(cell, frac, numbers, mask, n_images=n_images, cutoff=cutoff)
    n = jnp.maximum(jnp.sum(mask), 1).astype(frac.dtype)
    loss = en_weight * jnp.sum(co.wrong) / n
    if ideal_cn is not None:
        ideal = jnp.asarray(ideal_cn, dtype=frac.dtype)
        has = mask & (ideal >= 0)
        loss = loss + jnp.sum(jnp.where(has, jnp.abs(co.cn - ideal), 0.0)) / n
    return loss


def ideal_cn_table(
    cells,  # [B, 3, 3]
    fracs,  # [B, N, 3]
    numbers,  # [B, N]
    atom_masks,  # [B, N]
    *,
    n_images: tuple[int, int, int],
    cutoff: float = 6.0,
    batch_size: int = 256,
) -> np.ndarray:
    """Host helper: per-element median coordination over reference crystals.

    Args:
        cells: ``[B, 3, 3]`` reference cells [A] (e.g. the training split).
        fracs: ``[B, N, 3]`` padded fractional coordinates.
        numbers: ``[B, N]`` padded atomic numbers.
        atom_masks: ``[B, N]`` bool.
        n_images: Static image stencil covering ``cutoff`` for all cells.
        cutoff: Neighbour cutoff [A].
        batch_size: Structures per jitted call.

    Returns:
        ``[119]`` float64 numpy table, -1 for elements that never occur.
    """
    cells, fracs = np.asarray(cells), np.asarray(fracs)
    numbers, atom_masks = np.asarray(numbers), np.asarray(atom_masks, dtype=bool)
    fn = jax.jit(
        jax.vmap(partial(coordination_numbers, n_images=n_images, cutoff=cutoff)),
    )
    cns = []
    for s in range(0, len(cells), batch_size):
        sl = slice(s, s + batch_size)
        cns.append(np.asarray(fn(cells[sl], fracs[sl], numbers[sl], atom_masks[sl]).cn))
    cn = np.concatenate(cns, axis=0)
    table = np.full(elements.N_ELEMENTS, -1.0)
    z_all, cn_all = numbers[atom_masks], cn[atom_masks]
    for z in np.unique(z_all):
        table[z] = float(np.median(cn_all[z_all == z]))
    return table
