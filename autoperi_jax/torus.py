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

from typing import Any

import jax
import jax.numpy as jnp

from autoperi_jax.lattice import wrap_frac

__all__ = [
    "align_translation",
    "couple",
    "flow_path",
    "linear_sum_assignment",
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


def linear_sum_assignment(cost: Array) -> Array:
    """Exact minimum-cost perfect assignment of a square cost matrix, in jit.

    The Hungarian method with shortest augmenting paths and dual potentials (Kuhn 1955;
    Munkres 1957; the O(n^3) form of Jonker and Volgenant, 1987): rows are added one at
    a time, each by a Dijkstra-like search over reduced costs ``c_ij - u_i - v_j`` that
    ends at a free column, then the path is flipped. Static shapes, `jax.lax` loops only
    (no host callback), so it runs under `jax.jit` / `jax.vmap` on any device; the same
    optimum as `scipy.optimize.linear_sum_assignment` (ties may pick another optimum).

    Args:
      cost: [n, n] finite costs (use a large finite value, not inf, for forbidden pairs).

    Returns:
      [n] int32: the column assigned to each row.
    """
    n = cost.shape[0]
    big = jnp.asarray(jnp.finfo(cost.dtype).max / 4, cost.dtype)
    a = jnp.zeros((n + 1, n + 1), cost.dtype).at[1:, 1:].set(cost)  # 1-based, 0 = dummy
    cols = jnp.arange(n + 1)

    def add_row(i, state):
        u, v, p, way = state
        p = p.at[0].set(i)
        minv = jnp.full((n + 1,), big, cost.dtype)
        used = jnp.zeros((n + 1,), bool)

        def search(carry):
            u, v, minv, used, way, j0, _ = carry
            used = used.at[j0].set(True)
            i0 = p[j0]
            cur = a[i0] - u[i0] - v  # [n + 1] reduced costs from row i0
            better = ~used & (cur < minv)
            minv = jnp.where(better, cur, minv)
            way = jnp.where(better, j0, way)
            free = jnp.where(used | (cols == 0), big, minv)
            j1 = jnp.argmin(free)
            delta = free[j1]
            u = u.at[p].add(jnp.where(used, delta, 0.0))
            v = jnp.where(used, v - delta, v)
            minv = jnp.where(used, minv, minv - delta)
            return u, v, minv, used, way, j1, p[j1] != 0

        u, v, _, _, way, j0, _ = jax.lax.while_loop(
            lambda c: c[-1], search, (u, v, minv, used, way, 0, jnp.asarray(True))
        )

        def flip(carry):
            p, j0 = carry
            j1 = way[j0]
            return p.at[j0].set(p[j1]), j1

        p, _ = jax.lax.while_loop(lambda c: c[1] != 0, flip, (p, j0))
        return u, v, p, way

    zeros = jnp.zeros((n + 1,), cost.dtype)
    index = jnp.zeros((n + 1,), jnp.int32)
    _, _, p, _ = jax.lax.fori_loop(1, n + 1, add_row, (zeros, zeros, index, index))
    # p[j] = row (1-based) matched to column j; invert to the column of each row.
    return jnp.zeros((n + 1,), jnp.int32).at[p[1:]].set(jnp.arange(1, n + 1))[1:] - 1


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
    Klein, Kraemer and Noe, NeurIPS 2023). Exact, by `linear_sum_assignment` on the
    [A, A] cost matrix of each crystal (pairs of different species cost 1e6 A^2, more
    than any real pairing), O(A^3) per crystal.

    Returns:
      [G, A, 3] x1 with rows permuted within each crystal (padding slots pair with
      padding slots).
    """
    d = wrap_centered(x1[:, None, :, :] - x0[:, :, None, :])  # [G, A(noise), A(data), 3]
    cost = jnp.sum(jnp.einsum("gija,gab->gijb", d, cell) ** 2, -1)  # [G, A, A]
    same = numbers[:, :, None] == numbers[:, None, :]
    cost = jnp.where(same, cost, 1e6)
    best = jax.vmap(linear_sum_assignment)(cost)  # [G, A] data atom of each noise atom
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
