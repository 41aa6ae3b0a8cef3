"""Flow matching on the flat torus [0, 1)^3 per atom: the pure maths of the coordinate
decoder's training pairs (no network, no Flax).

* `wrap_centered`: the shortest periodic representative of a fractional displacement;
* `flow_path`: the point x_t and target velocity of the mean-free geodesic path;
* the coupling of data to noise (`couple`): the nearest translate (`align_translation`)
  and the optimal same-species pairing (`ot_pair`; Klein, Kraemer and Noe, NeurIPS 2023);
* `sort_by_species`: the slot order of the composition decoder.

Used by the loss and the decoder of `autoperi_jax.model`. Every array is a batch of dense
crystals, [G, A, ...] with an atom mask [G, A].
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import jax.numpy as jnp
import numpy as np

from autoperi_jax.lattice import wrap_frac

__all__ = [
    "align_translation",
    "couple",
    "flow_path",
    "ot_pair",
    "sort_by_species",
    "wrap_centered",
]

Array = jnp.ndarray


def wrap_centered(x: Array) -> Array:
    """Shortest periodic representative of a fractional displacement, in [-0.5, 0.5]."""
    return x - jnp.round(x)


def flow_path(
    x0: Array,  # [G, A, 3]
    x1: Array,  # [G, A, 3]
    t: Array,  # [G]
    mask: Array,  # [G, A] bool
) -> tuple[Array, Array]:
    """Point x_t and target velocity of the mean-free geodesic path on the torus.

    Returns:
      x_t [G, A, 3] in [0, 1) and w [G, A, 3] (0 on padding), with x_1 - mean_w the end
      of the path (a translate of x_1).
    """
    m = mask[..., None].astype(x0.dtype)
    w = wrap_centered(x1 - x0) * m
    mean = jnp.sum(w, 1, keepdims=True) / jnp.maximum(jnp.sum(m, 1, keepdims=True), 1.0)
    w = (w - mean) * m
    xt = wrap_frac(x0 + t[:, None, None] * w)
    return xt, w


@functools.lru_cache(maxsize=8)
def _all_permutations(n: int) -> np.ndarray:
    return np.asarray(list(itertools.permutations(range(n))), np.int32)  # [n!, n]


def ot_pair(
    x0: Array,  # [G, A, 3]
    x1: Array,  # [G, A, 3]
    numbers: Array,  # [G, A] int, 0 on padding
    cell: Array,  # [G, 3, 3]
) -> Array:
    """Re-orders the data atoms so each noise atom is paired with a data atom of the same
    species and the total squared periodic (Cartesian) displacement is minimal.

    Identical atoms are interchangeable, so any pairing is a valid flow-matching coupling;
    the optimal one gives straighter, less ambiguous paths (equivariant OT flow matching,
    Klein, Kraemer and Noe, NeurIPS 2023). Exact search over all A! permutations, so
    only for small ``A`` (`ModelSettings.ot_max_atoms`).

    Returns:
      [G, A, 3] x1 with rows permuted within each crystal (padding slots stay in place).
    """
    G, A = numbers.shape
    perms = jnp.asarray(_all_permutations(A))  # [P, A]
    d = wrap_centered(x1[:, None, :, :] - x0[:, :, None, :])  # [G, A(noise), A(data), 3]
    cost = jnp.sum(jnp.einsum("gija,gab->gijb", d, cell) ** 2, -1)  # [G, A, A]
    same = numbers[:, :, None] == numbers[:, None, :]
    cost = jnp.where(same, cost, 1e6)
    total = jnp.sum(cost[:, jnp.arange(A)[None, :], perms], -1)  # [G, P]
    best = perms[jnp.argmin(total, -1)]  # [G, A]
    return jnp.take_along_axis(x1, best[..., None], 1)


def align_translation(
    x0: Array,  # [G, A, 3]
    x1: Array,  # [G, A, 3]
    mask: Array,  # [G, A] bool
    num_starts: int = 16,
) -> Array:
    """Translates each data crystal to minimise its squared periodic displacement from the
    noise, sum_i |wrap(x1_i + c - x0_i)|^2 (fractional, per axis).

    z does not encode the origin, so every translate of x1 is an equally valid end point;
    choosing the nearest one gives short paths whose end point is far less ambiguous
    given x_t (the translational part of an OT coupling). Per axis the cost is piecewise
    quadratic in c with the local optimum c = s - mean(wrap(x1 - x0 + s)) near each
    start s; the best of ``num_starts`` evenly spaced starts is taken.

    Returns:
      [G, A, 3] translated x1 in [0, 1) (padding rows unchanged).
    """
    m = mask[:, None, :, None].astype(x0.dtype)  # [G, 1, A, 1]
    count = jnp.maximum(jnp.sum(m, 2), 1.0)  # [G, 1, 1]
    starts = jnp.arange(num_starts, dtype=x0.dtype)[None, :, None, None] / num_starts
    d = (x1 - x0)[:, None]  # [G, 1, A, 3]
    e = wrap_centered(d + starts)  # [G, S, A, 3]
    c = starts[:, :, 0] - jnp.sum(e * m, 2) / count  # [G, S, 3]
    cost = jnp.sum(wrap_centered(d + c[:, :, None, :]) ** 2 * m, 2)  # [G, S, 3]
    best = jnp.take_along_axis(c, jnp.argmin(cost, 1)[:, None, :], 1)  # [G, 1, 3]
    return jnp.where(mask[..., None], wrap_frac(x1 + best), x1)


def couple(
    x0: Array,  # [G, A, 3]
    x1: Array,  # [G, A, 3]
    numbers: Array,  # [G, A]
    mask: Array,  # [G, A]
    cell: Array,  # [G, 3, 3]
    settings: Any,
) -> Array:
    """x1 translated / re-paired to x0 (`align_translation`, `ot_pair`), as the
    ``ot_rounds`` / ``ot_translation`` / ``ot_max_atoms`` fields of ``settings`` (an
    `autoperi_jax.model.ModelSettings`) say."""
    A = mask.shape[1]
    for _ in range(settings.ot_rounds):
        if settings.ot_translation:
            x1 = align_translation(x0, x1, mask)
        if A <= settings.ot_max_atoms:
            x1 = ot_pair(x0, x1, numbers, cell)
    return x1


def sort_by_species(dense: Any) -> Any:
    """Dense crystals (`autoperi_jax.model.DenseCrystals`) with the atoms of each crystal
    sorted by atomic number (empty slots last), the slot order of the composition decoder."""
    key = jnp.where(dense.mask, dense.numbers, 1000)
    order = jnp.argsort(key, axis=1, stable=True)  # [G, A]

    def take(x):
        return jnp.take_along_axis(x, order.reshape(*order.shape, *([1] * (x.ndim - 2))), 1)

    return dense._replace(
        numbers=take(dense.numbers),
        frac=take(dense.frac),
        features=take(dense.features),
        mask=take(dense.mask),
    )
