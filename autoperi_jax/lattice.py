"""Lattice geometry shared by the host and jit: lattice parameters <-> cell, wrapping.

Every function accepts numpy or jax arrays (and works under ``jax.jit``), so the decoder,
the graph builder and the host-side I/O share one implementation. ``cell`` rows are the
lattice vectors (the convention of `autoperi_jax.crystal`). A module of its own so that
`autoperi_jax.graph` and `autoperi_jax.crystal` both import it and not each other.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["cell_to_lattice_params", "lattice_params_to_cell", "wrap_frac", "xp_of"]


def xp_of(x: Any):
    """numpy for host arrays, jax.numpy for traced / device arrays."""
    if isinstance(x, np.ndarray | float | int | list | tuple):
        return np
    import jax.numpy as jnp  # lazy: host-only users (data workers, the CLI) skip jax (0.6 s)

    return jnp


def wrap_frac(frac):
    """Wraps fractional coordinates into [0, 1).

    ``x % 1.0`` returns exactly 1.0 for tiny negative x in floating point; those are mapped
    to 0.0 so the result is strictly below 1.

    Args:
      frac: [..., 3] fractional coordinates (numpy or jax).

    Returns:
      [..., 3] coordinates in [0, 1).
    """
    xp = xp_of(frac)
    w = xp.mod(frac, 1.0)
    return xp.where(w >= 1.0, 0.0, w)


def cell_to_lattice_params(cell):
    """Lattice parameters of a cell.

    Args:
      cell: [..., 3, 3] rows are lattice vectors (A).

    Returns:
      [..., 6]: a, b, c in A and alpha, beta, gamma in degrees, where alpha is the angle
      between b and c, beta between a and c, gamma between a and b.
    """
    xp = xp_of(cell)
    lengths = xp.linalg.norm(cell, axis=-1)  # [..., 3]
    a, b, c = cell[..., 0, :], cell[..., 1, :], cell[..., 2, :]

    def angle(u, v, lu, lv):
        cos = xp.sum(u * v, axis=-1) / (lu * lv)
        return xp.degrees(xp.arccos(xp.clip(cos, -1.0, 1.0)))

    alpha = angle(b, c, lengths[..., 1], lengths[..., 2])
    beta = angle(a, c, lengths[..., 0], lengths[..., 2])
    gamma = angle(a, b, lengths[..., 0], lengths[..., 1])
    return xp.concatenate([lengths, xp.stack([alpha, beta, gamma], axis=-1)], axis=-1)


def lattice_params_to_cell(params):
    """Cell in the canonical orientation from lattice parameters.

    The orientation is ASE's ``cellpar_to_cell`` default: a along x, b in the xy plane,
    c completing a right-handed cell. Any rotation of a cell gives the same parameters;
    this picks one representative.

    Args:
      params: [..., 6] a, b, c (A), alpha, beta, gamma (degrees).

    Returns:
      [..., 3, 3] cell, rows are lattice vectors. The volume is positive whenever the
      angles describe a realisable cell.
    """
    xp = xp_of(params)
    a, b, c = params[..., 0], params[..., 1], params[..., 2]
    al, be, ga = (xp.radians(params[..., i]) for i in (3, 4, 5))
    cos_al, cos_be, cos_ga = xp.cos(al), xp.cos(be), xp.cos(ga)
    sin_ga = xp.sin(ga)
    cx = cos_be
    cy = (cos_al - cos_be * cos_ga) / sin_ga
    cz = xp.sqrt(xp.maximum(1.0 - cx**2 - cy**2, 0.0))
    zero = xp.zeros_like(a)
    va = xp.stack([a, zero, zero], axis=-1)
    vb = xp.stack([b * cos_ga, b * sin_ga, zero], axis=-1)
    vc = xp.stack([c * cx, c * cy, c * cz], axis=-1)
    return xp.stack([va, vb, vc], axis=-2)
