r"""Harmonic phonons of pair potentials without supercells: force constants per periodic edge.

For a pair potential ``E = 1/2 sum' V(|d|)`` the second derivative of one pair term with respect
to its edge vector ``d = r_ij^k`` is the 3x3 block

.. math::

    K(d) = V''(r)\,\hat d \hat d^T + \frac{V'(r)}{r} (I - \hat d \hat d^T), \qquad r = |d|,

so the real-space force constants between atom ``i`` of the home cell and atom ``j`` of the cell
``R = k @ cell`` are ``Phi(0i, Rj) = -K(r_ij^k)`` for every ``(j, k) != (i, 0)``, and the
on-site block follows from translation invariance (acoustic sum rule, exact for a pair
potential): ``Phi(0i, 0i) = sum_{(j, k) != (i, 0)} K(r_ij^k)``. The dynamical matrix is

.. math::

    D_{ia, jb}(q) = \frac{1}{\sqrt{m_i m_j}} \Big[\delta_{ij} \sum_{j', k} K_{ab}(r_{ij'}^k)
        - \sum_k K_{ab}(r_{ij}^k)\, e^{2\pi i\, q \cdot (k + \tau_j)} \Big],

with ``q`` in reduced coordinates of the reciprocal lattice (phonopy's convention) and
``tau_j = 0`` (``phase_convention="lattice"``, periodic in q) or ``tau_j = f_j - f_i``
(``"positions"``, phonopy's convention: ``D_pos = U^H D_lat U`` with
``U = diag(exp(2 pi i q . f_i))``; eigenvalues are identical, eigenvectors differ by these
phases). The eigenvalues of ``D`` are ``omega^2`` in eV/(A^2 amu); phonopy's ordinary-frequency
convention gives ``nu [THz] = sqrt(eig) * VASP_TO_THZ`` with
``VASP_TO_THZ = sqrt(eV / (A^2 amu)) / (2 pi) / 1e12 = 15.633302``. Imaginary modes are
reported as negative frequencies ``nu = sign(w2) sqrt(|w2|)``.

The phonon stability loss (METHOD section 2.5) is ``L_stability = max(0, -min omega^2)`` over a
q-point set [THz^2], excluding the three acoustic modes at Gamma (they are projected out exactly,
not dropped by index, so an unstable optical mode at Gamma still counts).
"""

from __future__ import annotations

from functools import partial
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from autoperi_jax.physics import elements
from autoperi_jax.physics.images import dense_pairs, wrap_frac
from autoperi_jax.physics.potentials import PairPotential, pair_energy

Array = jax.Array

# sqrt(eV / (A^2 amu)) / (2 pi) in THz (CODATA 2018), phonopy's VaspToTHz = 15.633302.
VASP_TO_THZ = float(np.sqrt(1.602176634e-19 / 1.66053906660e-27) * 1e10 / (2 * np.pi) / 1e12)

PhaseConvention = Literal["lattice", "positions"]


def monkhorst_pack(mesh: tuple[int, int, int], gamma_centered: bool = False) -> np.ndarray:
    """Monkhorst-Pack q-point grid in reduced coordinates (host, numpy).

    Args:
        mesh: ``(n1, n2, n3)`` points per reciprocal axis.
        gamma_centered: If True, ``q = r / n`` (contains Gamma); otherwise the Monkhorst-Pack
            points ``q = (2 r - n - 1) / (2 n)``, ``r = 1..n`` (Phys. Rev. B 13, 5188 (1976)).

    Returns:
        ``[n1 n2 n3, 3]`` float64 q-points.
    """
    axes = []
    for n in mesh:
        r = np.arange(n, dtype=np.float64)
        axes.append(r / n if gamma_centered else (2 * (r + 1) - n - 1) / (2 * n))
    grid = np.meshgrid(*axes, indexing="ij")
    return np.stack([g.ravel() for g in grid], axis=-1)


def gamma_and_mp_grid(mesh: tuple[int, int, int] = (4, 4, 4)) -> np.ndarray:
    """Gamma followed by the Monkhorst-Pack grid ``mesh``: ``[1 + n1 n2 n3, 3]`` (host)."""
    mp = monkhorst_pack(mesh)
    mp = mp[np.any(np.abs(mp) > 1e-12, axis=1)]
    return np.concatenate([np.zeros((1, 3)), mp], axis=0)


def _radial_derivatives(potential: PairPotential, r: Array, z_i: Array, z_j: Array):
    """Elementwise ``V'(r)`` and ``V''(r)`` of the cut-off pair energy by forward-mode AD."""

    def v(x):
        return pair_energy(potential, x, z_i, z_j)

    def dv(x):
        return jax.jvp(v, (x,), (jnp.ones_like(x),))[1]

    d1, d2 = jax.jvp(dv, (r,), (jnp.ones_like(r),))
    return d1, d2


def force_constant_blocks(
    cell: Array,  # [3, 3]
    frac: Array,  # [N, 3]
    numbers: Array,  # [N] int
    atom_mask: Array | None = None,  # [N] bool
    *,
    potential: PairPotential,
    n_images: tuple[int, int, int],
) -> tuple[Array, Array]:
    """Pair Hessian blocks ``K(r_ij^k) = d^2 V / d d d d^T`` for every periodic edge.

    ``Phi(0i, kj) = -K[i, j, k]``; see the module docstring.

    Args:
        cell: ``[3, 3]`` rows are lattice vectors [A].
        frac: ``[N, 3]`` fractional coordinates.
        numbers: ``[N]`` atomic numbers.
        atom_mask: ``[N]`` bool, True for real atoms; None means all real.
        potential: ``PairPotential``.
        n_images: Static image stencil covering the cutoff.

    Returns:
        ``(K [N, N, S, 3, 3] eV/A^2, zero for masked edges; shifts [S, 3] int)``.
    """
    pairs = dense_pairs(cell, frac, atom_mask, n_images)
    # masked edges sit beyond the cutoff, where V' = V'' = 0 (safe for gradients)
    r = jnp.where(pairs.valid, pairs.dist, 2.0 * potential.cutoff + 1.0)
    d1, d2 = _radial_derivatives(potential, r, numbers[:, None, None], numbers[None, :, None])
    unit = pairs.vec / r[..., None]  # [N, N, S, 3]
    outer = unit[..., :, None] * unit[..., None, :]  # [N, N, S, 3, 3]
    eye = jnp.eye(3, dtype=r.dtype)
    k = d2[..., None, None] * outer + (d1 / r)[..., None, None] * (eye - outer)
    k = jnp.where(pairs.valid[..., None, None], k, 0.0)
    return k, pairs.shifts


def _masses(numbers: Array, masses: Array | None, dtype) -> Array:
    if masses is None:
        masses = jnp.asarray(elements.ATOMIC_MASS)[numbers]
    return jnp.asarray(masses, dtype=dtype)


@partial(jax.jit, static_argnames=("n_images", "phase_convention"))
def dynamical_matrices(
    cell: Array,  # [3, 3]
    frac: Array,  # [N, 3]
    numbers: Array,  # [N] int
    atom_mask: Array | None,  # [N] bool
    qpoints: Array,  # [Q, 3]
    *,
    potential: PairPotential,
    n_images: tuple[int, int, int],
    masses: Array | None = None,  # [N] amu
    phase_convention: PhaseConvention = "lattice",
) -> Array:
    """Dynamical matrices ``D(q)`` [eV/(A^2 amu)] at reduced q-points.

    Rows/columns of padded atoms are zero (see ``phonon_frequencies`` for the mode mask).

    Args:
        cell: ``[3, 3]`` rows are lattice vectors [A].
        frac: ``[N, 3]`` fractional coordinates.
        numbers: ``[N]`` atomic numbers.
        atom_mask: ``[N]`` bool or None.
        qpoints: ``[Q, 3]`` q in reduced coordinates of the reciprocal lattice (no 2 pi).
        potential: ``PairPotential``.
        n_images: Static image stencil covering the cutoff.
        masses: ``[N]`` masses [amu]; default standard atomic weights of ``numbers``.
        phase_convention: ``"lattice"`` (``exp(2 pi i q.k)``) or ``"positions"``
            (``exp(2 pi i q.(k + f_j - f_i))``, phonopy's).

    Returns:
        ``[Q, 3N, 3N]`` complex Hermitian matrices, index ``3 i + a``.
    """
    n = frac.shape[0]
    dtype = frac.dtype
    k_blocks, shifts = force_constant_blocks(
        cell, frac, numbers, atom_mask, potential=potential, n_images=n_images
    )
    qpoints = jnp.asarray(qpoints, dtype=dtype)
    arg = 2.0 * jnp.pi * (qpoints @ shifts.astype(dtype).T)  # [Q, S]
    kq_re = jnp.einsum("ijsab,qs->qiajb", k_blocks, jnp.cos(arg))
    kq_im = jnp.einsum("ijsab,qs->qiajb", k_blocks, jnp.sin(arg))
    if phase_convention == "positions":
        f = wrap_frac(frac)
        parg = 2.0 * jnp.pi * jnp.einsum("qc,ijc->qij", qpoints, f[None, :, :] - f[:, None, :])
        c, s = jnp.cos(parg)[:, :, None, :, None], jnp.sin(parg)[:, :, None, :, None]
        kq_re, kq_im = kq_re * c - kq_im * s, kq_re * s + kq_im * c
    elif phase_convention != "lattice":
        raise ValueError(f"unknown phase_convention {phase_convention!r}")
    onsite = jnp.sum(k_blocks, axis=(1, 2))  # [N, 3, 3]
    onsite_full = jnp.einsum("ij,iab->iajb", jnp.eye(n, dtype=dtype), onsite)
    m = _masses(numbers, masses, dtype)
    if atom_mask is not None:
        m = jnp.where(atom_mask, m, 1.0)
    inv_sqrt_m = 1.0 / jnp.sqrt(m)
    scale = inv_sqrt_m[:, None, None, None] * inv_sqrt_m[None, None, :, None]  # [N,1,N,1]
    d_re = ((onsite_full[None] - kq_re) * scale).reshape(-1, 3 * n, 3 * n)
    d_im = (-kq_im * scale).reshape(-1, 3 * n, 3 * n)
    return jax.lax.complex(d_re, d_im)


class PhononResult(NamedTuple):
    """Phonon spectrum on a q-point set.

    Attributes:
        omega2: ``[Q, 3N]`` squared frequencies [THz^2], ascending per q; padded atoms' modes
            are moved to the end (large positive) and flagged by ``mode_mask``.
        frequencies: ``[Q, 3N]`` ``sign(omega2) sqrt(|omega2|)`` [THz] (phonopy convention,
            negative = imaginary).
        mode_mask: ``[3N]`` bool, True for the ``3 n_real`` modes of real atoms.
    """

    omega2: Array
    frequencies: Array
    mode_mask: Array


def _padding_shift(dmat: Array, atom_mask: Array | None) -> tuple[Array, Array]:
    """Put padded degrees of freedom at a value above the whole real spectrum."""
    n3 = dmat.shape[-1]
    if atom_mask is None:
        return dmat, jnp.ones((n3,), dtype=bool)
    dof_real = jnp.repeat(atom_mask, 3)  # [3N]
    bound = 1.0 + jnp.sum(jnp.abs(dmat), axis=(-2, -1))  # Gershgorin bound on |eig|
    pad = jnp.where(dof_real, 0.0, 1.0).astype(bound.dtype)
    dmat = dmat + (bound[:, None, None] * jnp.diag(pad)[None]).astype(dmat.dtype)
    mode_mask = jnp.arange(n3) < 3 * jnp.sum(atom_mask)
    return dmat, mode_mask


def _eigvalsh(dmat: Array) -> Array:
    dmat = 0.5 * (dmat + jnp.conj(jnp.swapaxes(dmat, -1, -2)))
    return jnp.linalg.eigvalsh(dmat)


def signed_sqrt(w2: Array) -> Array:
    """``sign(w2) sqrt(|w2|)`` with a finite gradient at 0."""
    a = jnp.abs(w2)
    safe = jnp.where(a > 1e-30, a, 1.0)
    return jnp.where(a > 1e-30, jnp.sign(w2) * jnp.sqrt(safe), 0.0)


@partial(jax.jit, static_argnames=("n_images", "phase_convention"))
def phonon_frequencies(
    cell: Array,  # [3, 3]
    frac: Array,  # [N, 3]
    numbers: Array,  # [N] int
    atom_mask: Array | None,  # [N] bool
    qpoints: Array,  # [Q, 3]
    *,
    potential: PairPotential,
    n_images: tuple[int, int, int],
    masses: Array | None = None,
    phase_convention: PhaseConvention = "lattice",
) -> PhononResult:
    """Squared frequencies [THz^2] and signed frequencies [THz] at q-points.

    Args:
        cell: ``[3, 3]`` rows are lattice vectors [A].
        frac: ``[N, 3]`` fractional coordinates.
        numbers: ``[N]`` atomic numbers.
        atom_mask: ``[N]`` bool or None.
        qpoints: ``[Q, 3]`` reduced q-points.
        potential: ``PairPotential``.
        n_images: Static image stencil covering the cutoff.
        masses: ``[N]`` masses [amu] or None for standard atomic weights.
        phase_convention: See ``dynamical_matrices`` (eigenvalues do not depend on it).

    Returns:
        ``PhononResult``.
    """
    dmat = dynamical_matrices(
        cell,
        frac,
        numbers,
        atom_mask,
        qpoints,
        potential=potential,
        n_images=n_images,
        masses=masses,
        phase_convention=phase_convention,
    )
    dmat, mode_mask = _padding_shift(dmat, atom_mask)
    omega2 = _eigvalsh(dmat) * VASP_TO_THZ**2
    return PhononResult(omega2=omega2, frequencies=signed_sqrt(omega2), mode_mask=mode_mask)


@partial(jax.jit, static_argnames=("n_images",))
def min_omega2(
    cell: Array,  # [3, 3]
    frac: Array,  # [N, 3]
    numbers: Array,  # [N] int
    atom_mask: Array | None,  # [N] bool
    qpoints: Array,  # [Q, 3]
    *,
    potential: PairPotential,
    n_images: tuple[int, int, int],
    masses: Array | None = None,
) -> Array:
    """Smallest squared frequency [THz^2] over ``qpoints``, acoustic modes at Gamma excluded.

    At every q that is a reciprocal lattice vector the three mass-weighted uniform translations
    ``e_a = sqrt(m_i / M) x_a`` (exact null vectors of ``D(Gamma)``) are shifted above the
    spectrum by adding ``c P_acoustic`` to ``D``; all other eigenvalues are unchanged.

    Args:
        cell: ``[3, 3]`` rows are lattice vectors [A].
        frac: ``[N, 3]`` fractional coordinates.
        numbers: ``[N]`` atomic numbers.
        atom_mask: ``[N]`` bool or None.
        qpoints: ``[Q, 3]`` reduced q-points (include Gamma to test optical modes there).
        potential: ``PairPotential``.
        n_images: Static image stencil covering the cutoff.
        masses: ``[N]`` masses [amu] or None.

    Returns:
        Scalar ``min omega^2`` [THz^2].
    """
    n = frac.shape[0]
    dtype = frac.dtype
    dmat = dynamical_matrices(
        cell, frac, numbers, atom_mask, qpoints, potential=potential, n_images=n_images,
        masses=masses,
    )  # fmt: skip
    dmat, _ = _padding_shift(dmat, atom_mask)
    m = _masses(numbers, masses, dtype)
    if atom_mask is not None:
        m = jnp.where(atom_mask, m, 0.0)
    w = jnp.sqrt(m / jnp.sum(m))  # [N]
    vecs = jnp.einsum("i,ab->aib", w, jnp.eye(3, dtype=dtype)).reshape(3, 3 * n)  # [3, 3N]
    proj = vecs.T @ vecs  # [3N, 3N]
    q = jnp.asarray(qpoints, dtype=dtype)
    is_gamma = jnp.all(jnp.abs(q - jnp.round(q)) < 1e-8, axis=-1)  # [Q]
    bound = 1.0 + jnp.sum(jnp.abs(dmat), axis=(-2, -1))  # [Q]
    shift = jnp.where(is_gamma, bound, 0.0)
    dmat = dmat + (shift[:, None, None] * proj[None]).astype(dmat.dtype)
    return jnp.min(_eigvalsh(dmat)) * VASP_TO_THZ**2


def stability_loss(
    cell: Array,  # [3, 3]
    frac: Array,  # [N, 3]
    numbers: Array,  # [N] int
    atom_mask: Array | None,  # [N] bool
    qpoints: Array,  # [Q, 3]
    *,
    potential: PairPotential,
    n_images: tuple[int, int, int],
    masses: Array | None = None,
    tolerance: float = 0.0,
) -> Array:
    """``L_stability = max(0, -min omega^2 - tolerance)`` [THz^2] (METHOD section 2.5).

    Args:
        cell: ``[3, 3]`` rows are lattice vectors [A].
        frac: ``[N, 3]`` fractional coordinates.
        numbers: ``[N]`` atomic numbers.
        atom_mask: ``[N]`` bool or None.
        qpoints: ``[Q, 3]`` reduced q-points, e.g. ``gamma_and_mp_grid((4, 4, 4))``.
        potential: ``PairPotential``.
        n_images: Static image stencil covering the cutoff.
        masses: ``[N]`` masses [amu] or None.
        tolerance: Squared frequency [THz^2] treated as numerically zero.

    Returns:
        Scalar loss [THz^2]; 0 for a dynamically stable structure.
    """
    w2 = min_omega2(
        cell, frac, numbers, atom_mask, qpoints, potential=potential, n_images=n_images,
        masses=masses,
    )  # fmt: skip
    return jnp.maximum(0.0, -w2 - tolerance)
