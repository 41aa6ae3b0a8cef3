"""Periodic-image pair geometry with static shapes (no minimum image).

Convention (the project's only one): ``cell`` is ``[3, 3]`` with ROWS the lattice vectors,
``cart = frac @ cell`` and the edge vector from atom ``i`` to the image ``k`` of atom ``j`` is

    r_ij^k = (frac[j] + k - frac[i]) @ cell,   k in Z^3.

Cells of crystal datasets are often smaller than any useful cutoff (Perov-5: 3.3-5.6 A), so an
atom interacts with many images of every other atom and with its own images. Inside ``jit``
shapes must be static, so we enumerate a fixed stencil of integer shifts
``k in [-n1, n1] x [-n2, n2] x [-n3, n3]`` (``n_images = (n1, n2, n3)``, a static Python tuple)
for every ordered atom pair ``(i, j)`` and mask what is beyond the cutoff. Fractional coordinates
are wrapped into ``[0, 1)`` first (with a zero-gradient ``floor``), so

    n_a = ceil(cutoff / h_a),   h_a = V / |b_c x b_d|  (height of the cell along axis a)

shifts per axis cover every pair within the cutoff (``n_images_for_cutoff``). The dense layout
``[N, N, S]`` (``S = prod(2 n_a + 1)``) is the fastest choice for the small cells of crystal
generative models; padded atoms are masked with ``atom_mask``.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def image_shifts(n_images: tuple[int, int, int]) -> np.ndarray:
    """Integer image stencil ``k`` for the static per-axis image counts.

    Args:
        n_images: ``(n1, n2, n3)``, shifts ``-n_a..n_a`` along each lattice vector.

    Returns:
        ``[S, 3]`` int32 numpy array, ``S = prod(2 n_a + 1)``; row ``S // 2`` is ``(0, 0, 0)``.
    """
    n1, n2, n3 = (int(n) for n in n_images)
    grid = itertools.product(range(-n1, n1 + 1), range(-n2, n2 + 1), range(-n3, n3 + 1))
    return np.asarray(list(grid), dtype=np.int32).reshape(-1, 3)


def cell_heights(cell: Array) -> Array:
    """Perpendicular heights of the cell, ``h_a = 1 / |b_a|`` with ``b = inv(cell).T``.

    Args:
        cell: ``[..., 3, 3]`` rows are lattice vectors [A].

    Returns:
        ``[..., 3]`` heights [A].
    """
    recip = jnp.swapaxes(jnp.linalg.inv(cell), -1, -2)  # rows b_a with a_i . b_j = delta_ij
    return 1.0 / jnp.linalg.norm(recip, axis=-1)


def n_images_for_cutoff(cell, cutoff: float) -> tuple[int, int, int]:
    """Host helper: the smallest static ``n_images`` that covers ``cutoff`` for these cells.

    Args:
        cell: ``[3, 3]`` or a batch ``[B, 3, 3]`` of cells [A] (numpy or jax, concrete values).
        cutoff: Interaction cutoff [A].

    Returns:
        ``(n1, n2, n3)`` Python ints (the max over the batch), at least 1 per axis.
    """
    cell = np.asarray(cell, dtype=np.float64).reshape(-1, 3, 3)
    recip = np.swapaxes(np.linalg.inv(cell), -1, -2)
    heights = 1.0 / np.linalg.norm(recip, axis=-1)  # [B, 3]
    n = np.ceil(cutoff / heights - 1e-9).astype(int).max(axis=0)
    return tuple(int(max(v, 1)) for v in n)  # type: ignore[return-value]


def images_cover_cutoff(cell: Array, cutoff: float, n_images: tuple[int, int, int]) -> Array:
    """Jittable check that the static stencil covers every pair within ``cutoff``.

    Use it inside ``jit`` (e.g. in a sampler whose cells are produced on device) to flag cells
    too thin for the chosen ``n_images``.

    Args:
        cell: ``[..., 3, 3]`` [A].
        cutoff: Cutoff [A].
        n_images: Static stencil extents.

    Returns:
        ``[...]`` bool, True where ``n_a >= cutoff / h_a`` on every axis.
    """
    n = jnp.asarray(n_images, dtype=cell.dtype)
    return jnp.all(n * cell_heights(cell) >= cutoff, axis=-1)


def wrap_frac(frac: Array) -> Array:
    """Wrap fractional coordinates into ``[0, 1)``; the gradient is the identity."""
    return frac - jax.lax.stop_gradient(jnp.floor(frac))


class DensePairs(NamedTuple):
    """All ordered pairs ``(i, j, k)`` of a structure on a static image stencil.

    Attributes:
        vec: ``[N, N, S, 3]`` edge vectors ``r_ij^k = (frac_j + k - frac_i) @ cell`` [A].
        dist: ``[N, N, S]`` distances [A]; 1.0 where ``valid`` is False (safe for gradients).
        valid: ``[N, N, S]`` bool: both atoms real, not the atom itself (``i == j, k == 0``),
            and non-zero length.
        shifts: ``[S, 3]`` integer image vectors ``k`` (constant).
    """

    vec: Array
    dist: Array
    valid: Array
    shifts: Array


def dense_pairs(
    cell: Array,  # [3, 3]
    frac: Array,  # [N, 3]
    atom_mask: Array | None,  # [N] bool
    n_images: tuple[int, int, int],
) -> DensePairs:
    """Enumerate all ordered atom pairs over a static periodic-image stencil.

    Zero-length and masked pairs go through the double ``where`` (``jax_md.util.safe_mask``
    style): their distance is replaced by 1 before the square root, so gradients stay finite.

    Args:
        cell: ``[3, 3]`` rows are lattice vectors [A].
        frac: ``[N, 3]`` fractional coordinates (any real values; wrapped internally).
        atom_mask: ``[N]`` bool, True for real atoms; None means all real.
        n_images: Static ``(n1, n2, n3)``; see ``n_images_for_cutoff``.

    Returns:
        ``DensePairs`` with ``[N, N, S, ...]`` arrays.
    """
    n_atoms = frac.shape[0]
    if atom_mask is None:
        atom_mask = jnp.ones((n_atoms,), dtype=bool)
    shifts_np = image_shifts(n_images)
    shifts = jnp.asarray(shifts_np, dtype=frac.dtype)  # [S, 3]
    f = wrap_frac(frac)
    dfrac = f[None, :, None, :] - f[:, None, None, :] + shifts[None, None, :, :]  # [N, N, S, 3]
    vec = dfrac @ cell  # [N, N, S, 3]
    r2 = jnp.sum(vec * vec, axis=-1)  # [N, N, S]
    eye = jnp.eye(n_atoms, dtype=bool)[:, :, None]
    zero_shift = jnp.asarray(np.all(shifts_np == 0, axis=1))[None, None, :]
    pair_real = atom_mask[:, None, None] & atom_mask[None, :, None]
    valid = pair_real & ~(eye & zero_shift) & (r2 > 1e-12)
    dist = jnp.sqrt(jnp.where(valid, r2, 1.0))
    return DensePairs(vec=vec, dist=dist, valid=valid, shifts=jnp.asarray(shifts_np))
