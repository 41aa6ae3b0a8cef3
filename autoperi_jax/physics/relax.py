r"""Jitted, batched structure relaxation (jax-md FIRE) and the sampler's constraint layer.

``relax`` minimises the pair energy with ``jax_md.minimize.fire_descent`` (Bitzek et al.,
Phys. Rev. Lett. 97, 170201 (2006)) for a fixed step budget (``lax.fori_loop``, static shapes,
``vmap``-able). The degrees of freedom are a pytree:

* ``u`` ``[N, 3]``: Cartesian displacements of the atoms in the reference cell,
  ``frac = frac0 + u @ cell0^{-1}``;
* ``s`` ``[3, 3]`` (only with ``relax_cell=True``): a scaled strain, ``cell = cell0 (I + s / c)``
  with ``c = n_atoms`` (ASE's ``UnitCellFilter`` cell factor), so the generalised force on ``s``
  is ``-dE/d eps / c = -V sigma / c`` [eV] and has the scale of an atomic force.

Under a strain the fractional coordinates do not change (``cart = (x0 + u)(I + eps)``), so the
atoms follow the cell. A structure counts as converged at the first step where every atomic force
(and, with the cell, every ``|V sigma_ab| / c``) is below ``fmax``; from then on its state is
frozen, so a batch runs the full budget but every member keeps its first converged state.

``repulsive_constraint`` is the sampler's differentiable clean-up layer: a fixed number of
gradient steps on a soft-sphere overlap energy so that no two atoms (over all periodic images)
stay closer than ``fraction * (r_cov_i + r_cov_j)``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax_md import minimize

from autoperi_jax.physics.images import dense_pairs, wrap_frac
from autoperi_jax.physics.potentials import (
    PairPotential,
    covalent_soft_sphere,
    energy,
    energy_forces_stress,
    pair_energy,
)

Array = jax.Array


class RelaxResult(NamedTuple):
    """Outcome of ``relax`` for one structure (add a leading ``[B]`` axis when vmapped).

    Attributes:
        cell: ``[3, 3]`` relaxed cell [A] (unchanged unless ``relax_cell``).
        frac: ``[N, 3]`` relaxed fractional coordinates, wrapped into ``[0, 1)``.
        energy: Final energy [eV].
        forces: ``[N, 3]`` final Cartesian forces [eV/A].
        stress: ``[3, 3]`` final stress [eV/A^3].
        fmax: Largest generalised force of the final state [eV/A] (see module docstring).
        converged: True if ``fmax < fmax`` threshold was reached within the budget.
        n_steps: FIRE steps taken until convergence (the budget if not converged).
    """

    cell: Array
    frac: Array
    energy: Array
    forces: Array
    stress: Array
    fmax: Array
    converged: Array
    n_steps: Array


@partial(
    jax.jit,
    static_argnames=("n_images", "n_steps", "relax_cell", "dt_start", "dt_max", "early_exit"),
)
def relax(
    cell: Array,  # [3, 3]
    frac: Array,  # [N, 3]
    numbers: Array,  # [N] int
    atom_mask: Array | None = None,  # [N] bool
    *,
    potential: PairPotential,
    n_images: tuple[int, int, int],
    n_steps: int = 500,
    fmax: float = 1e-3,
    relax_cell: bool = False,
    dt_start: float = 0.05,
    dt_max: float = 0.2,
    max_step: float = 0.2,
    early_exit: bool = False,
) -> RelaxResult:
    """Relax atomic positions (and optionally the cell) with FIRE for a fixed step budget.

    Args:
        cell: ``[3, 3]`` rows are lattice vectors [A].
        frac: ``[N, 3]`` fractional coordinates.
        numbers: ``[N]`` atomic numbers.
        atom_mask: ``[N]`` bool; padded atoms do not move. None means all real.
        potential: ``PairPotential``.
        n_images: Static image stencil covering the cutoff; with ``relax_cell`` leave margin
            for the cell to shrink (the stencil is not recomputed).
        n_steps: Static FIRE step budget.
        fmax: Convergence threshold on the largest force [eV/A]. Stiff potentials (UFF on
            ionic crystals) in float32 can need several thousand steps for 1e-3 eV/A; use
            float64 for tight thresholds.
        relax_cell: Also relax the cell (strain degrees of freedom).
        dt_start: FIRE initial time step (jax-md units with unit masses).
        dt_max: FIRE maximum time step.
        max_step: Largest displacement of one atom (or strain row, in units of ``s``) per
            step [A], as ASE's ``FIRE(maxstep=0.2)``; keeps strongly repulsive starts stable.
        early_exit: Stop once converged (``lax.while_loop``; under ``vmap`` once every member
            has converged). Faster, but not reverse-mode differentiable; the default fixed
            budget (``lax.fori_loop``) is.

    Returns:
        ``RelaxResult``.
    """
    n = frac.shape[0]
    dtype = frac.dtype
    mask = jnp.ones((n,), dtype=bool) if atom_mask is None else atom_mask
    n_real = jnp.maximum(jnp.sum(mask), 1).astype(dtype)
    inv_cell0 = jnp.linalg.inv(cell)
    eye = jnp.eye(3, dtype=dtype)

    def unpack(dof):
        f = frac + dof["u"] @ inv_cell0
        c = cell @ (eye + dof["s"] / n_real) if relax_cell else cell
        return c, f

    def energy_fn(dof):
        c, f = unpack(dof)
        return energy(c, f, numbers, mask, potential=potential, n_images=n_images)

    def force_fn(dof, **unused):
        g = jax.grad(energy_fn)(dof)
        out = {"u": jnp.where(mask[:, None], -g["u"], 0.0)}
        out["s"] = -g["s"] if relax_cell else jnp.zeros_like(g["s"])
        return out

    def gen_fmax(force):
        fa = jnp.sqrt(jnp.max(jnp.sum(force["u"] ** 2, axis=-1)))
        return jnp.maximum(fa, jnp.max(jnp.abs(force["s"])))

    def shift_fn(r, dr, **unused):  # applied leaf by leaf by jax-md
        # cap every row of the step at max_step (ASE's FIRE does the same)
        norm = jnp.sqrt(jnp.sum(dr * dr, axis=-1, keepdims=True) + 1e-30)
        return r + dr * jnp.minimum(1.0, max_step / norm)

    init_fn, apply_fn = minimize.fire_descent(force_fn, shift_fn, dt_start=dt_start, dt_max=dt_max)
    dof0 = {"u": jnp.zeros_like(frac), "s": jnp.zeros_like(cell)}
    unit_mass = {"u": jnp.ones((), dtype), "s": jnp.ones((), dtype)}  # a pytree like dof0
    state0 = init_fn(dof0, mass=unit_mass)
    done0 = gen_fmax(state0.force) < fmax

    def body(step, carry):
        state, done, steps = carry
        new = apply_fn(state)
        state = jax.tree_util.tree_map(lambda old, nw: jnp.where(done, old, nw), state, new)
        steps = jnp.where(done, steps, step + 1)
        done = done | (gen_fmax(state.force) < fmax)
        return state, done, steps

    carry0 = (state0, done0, jnp.zeros((), jnp.int32))
    if early_exit:

        def cond(c):
            return (~c[1]) & (c[2] < n_steps)

        def while_body(c):
            return body(c[2], c)

        state, done, steps = jax.lax.while_loop(cond, while_body, carry0)
    else:
        state, done, steps = jax.lax.fori_loop(0, n_steps, body, carry0)
    c, f = unpack(state.position)
    e, forces, sigma = energy_forces_stress(
        c, f, numbers, mask, potential=potential, n_images=n_images
    )
    return RelaxResult(
        cell=c,
        frac=wrap_frac(f),
        energy=e,
        forces=forces,
        stress=sigma,
        fmax=gen_fmax(state.force),
        converged=done,
        n_steps=steps,
    )


def batch_relax(
    cell: Array,  # [B, 3, 3]
    frac: Array,  # [B, N, 3]
    numbers: Array,  # [B, N]
    atom_mask: Array,  # [B, N] bool
    *,
    potential: PairPotential,
    n_images: tuple[int, int, int],
    n_steps: int = 500,
    fmax: float = 1e-3,
    relax_cell: bool = False,
    dt_start: float = 0.05,
    dt_max: float = 0.2,
    max_step: float = 0.2,
    early_exit: bool = False,
) -> RelaxResult:
    """``relax`` vmapped over a padded batch; every field gets a leading ``[B]`` axis."""
    fn = partial(
        relax,
        potential=potential,
        n_images=n_images,
        n_steps=n_steps,
        fmax=fmax,
        relax_cell=relax_cell,
        dt_start=dt_start,
        dt_max=dt_max,
        max_step=max_step,
        early_exit=early_exit,
    )
    return jax.vmap(fn)(cell, frac, numbers, atom_mask)


@partial(jax.jit, static_argnames=("n_images", "n_steps"))
def repulsive_constraint(
    cell: Array,  # [3, 3]
    frac: Array,  # [N, 3]
    numbers: Array,  # [N] int
    atom_mask: Array | None = None,  # [N] bool
    *,
    n_images: tuple[int, int, int],
    n_steps: int = 20,
    step_size: float = 0.4,
    potential: PairPotential | None = None,
) -> Array:
    """Differentiable clean-up: push apart atoms closer than a species-aware minimum distance.

    Runs ``n_steps`` gradient steps ``x <- x - step_size * dE/dx`` (Cartesian, cell fixed) on
    the soft-sphere overlap energy ``E = sum_{i<j} (d_ij - r_ij)^2 / 2`` for ``r_ij < d_ij``
    (``covalent_soft_sphere``: ``d_ij = 0.6 (r_cov_i + r_cov_j)``), i.e. a Jacobi projection that
    moves each atom of an overlapping pair by ``step_size`` times the overlap. Atoms already
    farther apart than ``d_ij`` from everything do not move, so the layer is the identity on
    valid crystals. Fully differentiable (unrolled ``lax.fori_loop``), jittable and ``vmap``-able.
    An atom's overlap with its own periodic images cannot be removed without changing the cell.

    Args:
        cell: ``[3, 3]`` rows are lattice vectors [A].
        frac: ``[N, 3]`` fractional coordinates.
        numbers: ``[N]`` atomic numbers.
        atom_mask: ``[N]`` bool; padded atoms do not move. None means all real.
        n_images: Static image stencil covering ``potential.cutoff`` (< 3 A by default).
        n_steps: Static number of steps.
        step_size: Gradient step [A^2/eV]; with the default unit stiffness, 0.5 resolves an
            isolated overlapping pair in one step, smaller values damp crowded overlaps.
        potential: A soft-sphere ``PairPotential``; default ``covalent_soft_sphere()``.

    Returns:
        ``[N, 3]`` fractional coordinates, wrapped into ``[0, 1)``.
    """
    if potential is None:
        potential = covalent_soft_sphere()
    mask = jnp.ones((frac.shape[0],), dtype=bool) if atom_mask is None else atom_mask
    inv_cell = jnp.linalg.inv(cell)

    def e_cart(x):
        return energy(cell, x @ inv_cell, numbers, mask, potential=potential, n_images=n_images)

    def body(_, x):
        g = jax.grad(e_cart)(x)
        return x - step_size * jnp.where(mask[:, None], g, 0.0)

    x = jax.lax.fori_loop(0, n_steps, body, frac @ cell)
    return wrap_frac(x @ inv_cell)


def _listed_constraint(
    cell: Array,  # [B, 3, 3]
    frac: Array,  # [B, N, 3]
    numbers: Array,  # [B, N] int
    mask: Array,  # [B, N] bool
    *,
    n_images: tuple[int, int, int],
    n_steps: int,
    step_size: float,
    potential: PairPotential,
    max_neighbors: int,
    skin: float,
) -> tuple[Array, Array]:
    """`repulsive_constraint` of a batch on one edge list built at the start.

    The list holds every (i, j, k) closer than ``R = potential.cutoff + skin`` (the
    largest ``d_ij`` plus the skin), for the whole batch in ``B N max_neighbors`` slots
    (`autoperi_jax.graph.periodic_candidates`: each pair enumerates the images its cell
    needs); the steps then evaluate these pairs only (Cartesian positions, images fixed).
    A pair with no image on the list is at ``R`` or farther at the start and comes closer
    by at most the sum of its two atoms' largest displacements over the steps; while
    that keeps it at ``d_ij`` or more it exerts no force, and the listed steps are
    exactly the dense ones. (A bound per pair, not the global ``skin / 2`` of molecular
    dynamics: the sampler's overlapping candidates move atoms by more than 0.5 A.)

    Returns:
      (frac [B, N, 3] wrapped, complete [B]): ``complete`` is False where a pair off the
      list could have come closer than ``d_ij`` (``R - d_ij`` below its two atoms'
      largest displacements), where the batch's list overflowed and cut this crystal's
      edges, or where the list's fallback range missed the cell; the result equals the
      dense layer's otherwise (up to float rounding).
    """
    from autoperi_jax.graph import candidates_whole, periodic_candidates  # in-jit list

    B, N = mask.shape
    radius = float(potential.cutoff) + skin
    f0 = wrap_frac(frac)
    cand = periodic_candidates(f0, cell, mask, radius, max(n_images), N * max_neighbors)
    recv, send, edge_graph = cand.receivers, cand.senders, cand.edge_graph  # [M]
    shift_cart = jnp.einsum("ea,eab->eb", cand.shifts.astype(frac.dtype), cell[edge_graph])
    flat_numbers = numbers.reshape(-1)
    z_i, z_j = flat_numbers[recv], flat_numbers[send]  # [M]
    flat_mask = mask.reshape(-1)  # [B N]
    x0 = jnp.einsum("bna,bac->bnc", f0, cell).reshape(-1, 3)  # [B N, 3]

    def e_cart(x):
        vec = x[send] - x[recv] + shift_cart  # [M, 3]
        r2 = jnp.sum(vec * vec, -1)
        ok = cand.mask & (r2 > 1e-12)
        v = pair_energy(potential, jnp.sqrt(jnp.where(ok, r2, 1.0)), z_i, z_j)
        return 0.5 * jnp.sum(jnp.where(ok, v, 0.0))

    def body(_, carry):
        x, far = carry  # [B N, 3], [B N] largest squared displacement so far
        g = jax.grad(e_cart)(x)
        x = x - step_size * jnp.where(flat_mask[:, None], g, 0.0)
        return x, jnp.maximum(far, jnp.sum((x - x0) ** 2, -1))

    x, far = jax.lax.fori_loop(0, n_steps, body, (x0, jnp.zeros_like(x0[:, 0])))
    reach = jnp.sqrt(jnp.where(flat_mask, far, 0.0)).reshape(B, N)
    d_ij = potential.sigma[numbers[:, :, None], numbers[:, None, :]].astype(frac.dtype)
    pair_real = mask[:, :, None] & mask[:, None, :]  # [B, N, N]
    safe = ~pair_real | (radius - d_ij > reach[:, :, None] + reach[:, None, :])
    complete = jnp.all(safe, axis=(1, 2)) & candidates_whole(cand)
    out = jnp.einsum("bna,bac->bnc", x.reshape(B, N, 3), jnp.linalg.inv(cell))
    return wrap_frac(out), complete


def batched_repulsive_constraint(
    cell: Array,  # [B, 3, 3]
    frac: Array,  # [B, N, 3]
    numbers: Array,  # [B, N] int
    atom_mask: Array,  # [B, N] bool
    *,
    n_images: tuple[int, int, int],
    n_steps: int = 20,
    step_size: float = 0.4,
    potential: PairPotential | None = None,
    max_neighbors: int = 32,
    skin: float = 1.0,
    redo_fraction: float = 1 / 16,
) -> Array:
    """`repulsive_constraint` over a batch, on a neighbour list, with the same result.

    The batch runs on one edge list built at the start (every pair within the largest
    ``d_ij`` plus ``skin``, each pair over the images its cell needs; `_listed_constraint`):
    the pairs in reach instead of every pair x the ``n_images`` stencil. Structures whose
    list may have missed a contact (a pair off the list whose distance to ``d_ij`` is
    below its atoms' displacements: strongly overlapping candidates), or lost edges to a
    full list, are redone with the dense layer: up to ``ceil(redo_fraction B)`` of them
    gathered into a small batch, all B if there are more (``lax.cond`` outside the batch:
    each costs only when needed, unless this function is itself vmapped).

    Args:
        cell, frac, numbers, atom_mask: a batch of padded structures.
        n_images, n_steps, step_size, potential: as `repulsive_constraint`.
        max_neighbors: static edge slots per atom slot in the batch's list.
        skin: distance beyond the largest ``d_ij`` within which pairs are listed [A].
        redo_fraction: size of the small dense batch, as a fraction of B (static).

    Returns:
        ``[B, N, 3]`` fractional coordinates, wrapped into ``[0, 1)``.
    """
    if potential is None:
        potential = covalent_soft_sphere()
    opts = dict(n_images=n_images, n_steps=n_steps, step_size=step_size, potential=potential)
    out, complete = _listed_constraint(
        cell, frac, numbers, atom_mask, max_neighbors=max_neighbors, skin=skin, **opts
    )  # [B, N, 3], [B]
    dense = jax.vmap(partial(repulsive_constraint, **opts))
    n_redo = max(1, min(cell.shape[0], math.ceil(redo_fraction * cell.shape[0])))
    rows = jnp.argsort(complete, stable=True)[:n_redo]  # [n_redo] incomplete ones first

    def redo_some(out):
        sub = dense(cell[rows], frac[rows], numbers[rows], atom_mask[rows])
        return out.at[rows].set(jnp.where(complete[rows][:, None, None], out[rows], sub))

    def redo_all(out):
        return jnp.where(complete[:, None, None], out, dense(cell, frac, numbers, atom_mask))

    n_bad = jnp.sum(~complete)
    return jax.lax.cond(
        n_bad == 0,
        lambda o: o,
        lambda o: jax.lax.cond(n_bad <= n_redo, redo_some, redo_all, o),
        out,
    )


def _min_scaled_distance(
    cell: Array,  # [3, 3]
    frac: Array,  # [N, 3]
    atom_mask: Array | None,  # [N] bool
    n_images: tuple[int, int, int],
    scale: Array | None,  # [N, N] or None
) -> Array:
    """Smallest ``r_ij^k / scale_ij`` over every periodic pair of two real atoms other than
    an atom with itself (``i == j, k == 0``). Unlike ``DensePairs.valid`` this keeps
    coincident atoms: they give 0. A check, not a loss: the square root of 0 has no
    gradient."""
    pairs = dense_pairs(cell, frac, atom_mask, n_images)
    n = frac.shape[0]
    mask = jnp.ones((n,), bool) if atom_mask is None else atom_mask
    r2 = jnp.sum(pairs.vec**2, -1)  # [N, N, S]
    if scale is not None:
        r2 = r2 / scale[:, :, None] ** 2
    self_pair = jnp.eye(n, dtype=bool)[..., None] & jnp.all(pairs.shifts == 0, -1)[None, None]
    real = mask[:, None, None] & mask[None, :, None] & ~self_pair  # [N, N, S]
    return jnp.sqrt(jnp.min(jnp.where(real, r2, jnp.inf)))


@partial(jax.jit, static_argnames=("n_images",))
def min_distance(
    cell: Array,  # [3, 3]
    frac: Array,  # [N, 3]
    atom_mask: Array | None = None,  # [N] bool
    *,
    n_images: tuple[int, int, int],
) -> Array:
    """Smallest periodic distance between two atoms [A] (0 for coincident atoms; inf for
    one atom whose images lie beyond the stencil).

    Args:
        cell: ``[3, 3]`` [A].
        frac: ``[N, 3]``.
        atom_mask: ``[N]`` bool or None.
        n_images: Static image stencil.

    Returns:
        Scalar [A].
    """
    return _min_scaled_distance(cell, frac, atom_mask, n_images, None)


@partial(jax.jit, static_argnames=("n_images",))
def min_distance_ratio(
    cell: Array,  # [3, 3]
    frac: Array,  # [N, 3]
    numbers: Array,  # [N] int
    atom_mask: Array | None = None,  # [N] bool
    *,
    n_images: tuple[int, int, int],
    potential: PairPotential | None = None,
) -> Array:
    """Smallest ``r_ij / d_ij`` over all periodic pairs (``d_ij`` from the soft-sphere table;
    coincident atoms give 0).

    Args:
        cell: ``[3, 3]`` [A].
        frac: ``[N, 3]``.
        numbers: ``[N]``.
        atom_mask: ``[N]`` bool or None.
        n_images: Static image stencil.
        potential: Soft-sphere table; default ``covalent_soft_sphere()``.

    Returns:
        Scalar; ``>= 1`` means no pair violates the minimum distance.
    """
    if potential is None:
        potential = covalent_soft_sphere()
    d = potential.sigma[numbers[:, None], numbers[None, :]].astype(frac.dtype)  # [N, N]
    return _min_scaled_distance(cell, frac, atom_mask, n_images, d)


def batched_min_distance_ratio(
    cell: Array,  # [B, 3, 3]
    frac: Array,  # [B, N, 3]
    numbers: Array,  # [B, N] int
    atom_mask: Array,  # [B, N] bool
    *,
    n_images: tuple[int, int, int],
    potential: PairPotential | None = None,
    upto: float = 1.0,
    max_neighbors: int = 64,
) -> Array:
    """`min_distance_ratio` of a batch, capped at ``upto``: ``min(upto, min r_ij / d_ij)``.

    A ratio below ``upto`` needs a pair closer than ``upto * d_ij``, so one edge list of
    the batch within ``upto`` x the largest ``d_ij`` (`autoperi_jax.graph.
    periodic_candidates`, ``B N max_neighbors`` slots, each pair over the images its cell
    needs) finds it, instead of every pair x the ``n_images`` stencil. If the list lost
    edges (a full list, or a cell its fallback range misses), the whole batch is computed
    on the dense stencil instead (``lax.cond``), so the result is the same either way.

    Args:
        cell, frac, numbers, atom_mask: a batch of padded structures.
        n_images: the dense stencil (and the list's fallback range).
        potential: Soft-sphere table; default ``covalent_soft_sphere()``.
        upto: the cap (static); the sampler's acceptance threshold needs ``upto >= it``.
        max_neighbors: static edge slots per atom slot in the list.

    Returns:
        ``[B]``; ``upto`` where no pair is closer than ``upto * d_ij``.
    """
    from autoperi_jax.graph import candidates_whole, periodic_candidates  # in-jit list

    if potential is None:
        potential = covalent_soft_sphere()
    B, N = atom_mask.shape
    cand = periodic_candidates(
        wrap_frac(frac),
        cell,
        atom_mask,
        upto * float(potential.cutoff),
        max(n_images),
        N * max_neighbors,
    )
    flat = numbers.reshape(-1)
    d = potential.sigma[flat[cand.receivers], flat[cand.senders]].astype(frac.dtype)  # [M]
    ratio = jnp.where(cand.mask, cand.distances / d, jnp.inf)
    listed = jnp.minimum(jax.ops.segment_min(ratio, cand.edge_graph, B), upto)  # [B]
    exact = jnp.all(candidates_whole(cand))

    def dense(_):
        one = partial(min_distance_ratio, n_images=n_images, potential=potential)
        return jnp.minimum(jax.vmap(one)(cell, frac, numbers, atom_mask), upto)

    return jax.lax.cond(exact, lambda _: listed, dense, None)
