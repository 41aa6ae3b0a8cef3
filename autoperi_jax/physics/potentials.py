r"""Element-dependent pair potentials over all periodic images, built on jax-md pair functions.

The energy of a crystal (cell rows = lattice vectors, ``cart = frac @ cell``) is

.. math::

    E = \sum_{i<j} V(r_{ij}) = \frac12 \sum_{i, j} \sum_{k \in \mathbb{Z}^3}{}^{'}
        V_{Z_i Z_j}(|(f_j + k - f_i)\,\mathrm{cell}|),

where the primed sum skips ``i == j, k == 0`` (an atom interacts with its own periodic images)
and runs over every image within the cutoff. ``V`` is one of jax-md's pair functions
(``jax_md.energy.lennard_jones``, ``morse``, ``soft_sphere``) with per-element-pair parameters
gathered from ``[119, 119]`` tables, truncated at ``cutoff`` in one of three modes:

* ``"smooth"``: ``V(r) S(r)`` with the C^1 switch of HOOMD-blue / jax-md
  (``jax_md.energy.multiplicative_isotropic_cutoff``; identical to ASE's
  ``LennardJones(smooth=True)``): ``S = 1`` for ``r < r_on``,
  ``S = (r_c^2 - r^2)^2 (r_c^2 + 2 r^2 - 3 r_on^2) / (r_c^2 - r_on^2)^3`` for
  ``r_on <= r < r_c``, ``S = 0`` beyond.
* ``"shift"``: ``V(r) - V(r_c)`` for ``r < r_c`` (ASE's ``LennardJones(smooth=False)``); the
  energy is continuous, forces jump at ``r_c``.
* ``"none"``: plain truncation ``V(r)`` for ``r < r_c``.

Forces ``F = -dE/d cart`` [eV/A] come from autodiff; the stress [eV/A^3] is the strain derivative

.. math::

    \sigma = \frac{1}{V} \frac{\partial E(\mathrm{cell}\,(I + \varepsilon),\ f)}
                              {\partial \varepsilon}\Big|_{\varepsilon = 0}

at fixed fractional coordinates, which is ASE's sign convention (negative under compression).

Default parameters are the Universal Force Field van der Waals terms (Rappe et al., J. Am. Chem.
Soc. 114, 10024 (1992)): ``V_ij = D_ij [(x_ij / r)^12 - 2 (x_ij / r)^6]``, i.e. Lennard-Jones
with ``sigma_ij = x_ij / 2^(1/6)`` and ``epsilon_ij = D_ij``, with UFF's geometric mixing
``x_ij = sqrt(x_i x_j)``, ``D_ij = sqrt(D_i D_j)`` (or Lorentz-Berthelot, arithmetic ``x_ij``).
UFF parameters describe non-bonded contacts: they are a smooth, cheap "simplified interatomic
potential", not a model of ionic or covalent bonding (bonded distances sit on the repulsive wall).

Kind ``"born_morse_coulomb"`` (`born_morse_coulomb_pair`: Born-Mayer + Morse + screened
Coulomb) is the form of the potentials fitted to an MLIP (`autoperi_jax.physics.fitted`,
``fitted_potential("fitted_chgnet")``): per-element parameters mixed into pair tables.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax_md import dataclasses as jmd_dataclasses
from jax_md import energy as jmd_energy

from autoperi_jax.physics import elements
from autoperi_jax.physics.images import DensePairs, dense_pairs

Array = jax.Array
PotentialKind = Literal["lj", "morse", "soft_sphere", "born_morse_coulomb"]
KINDS = ("lj", "morse", "soft_sphere", "born_morse_coulomb")
#: Coulomb's constant e^2 / (4 pi eps0) [eV A].
COULOMB_K = 14.399645478425668
CutoffMode = Literal["smooth", "shift", "none"]


@jmd_dataclasses.dataclass
class PairPotential:
    """A pair potential: parameter tables (pytree leaves) plus static settings.

    Pass it as an ordinary argument to jitted functions; changing a static field retraces.

    Attributes:
        sigma: ``[119, 119]`` length parameter per element pair [A]: LJ ``sigma``
            (minimum at ``2^(1/6) sigma``), Morse equilibrium distance, soft-sphere diameter.
        epsilon: ``[119, 119]`` energy scale [eV] (LJ / Morse well depth, soft-sphere stiffness).
        alpha: ``[119, 119]`` Morse range parameter [1/A] or soft-sphere exponent (unused by LJ).
        kind: ``"lj"``, ``"morse"``, ``"soft_sphere"`` or ``"born_morse_coulomb"``
            (`born_morse_coulomb_pair`; the fitted potentials of `physics.fitted`).
        cutoff: Cutoff radius ``r_c`` [A].
        onset: Switch onset ``r_on`` [A] (``"smooth"`` mode only).
        cutoff_mode: ``"smooth"``, ``"shift"`` or ``"none"`` (see module docstring).
        extra: ``[3, 119, 119]`` further tables of ``"born_morse_coulomb"``: Born-Mayer
            prefactor ``A`` [eV], its decay length ``rho`` [A] and the charge product
            ``q_i q_j`` [e^2]; None for the other kinds.
        damping: Coulomb damping ``(alpha_c [1/A], 1/w [1/A])`` of ``"born_morse_coulomb"``:
            long-range Wolf damping and the Gaussian charge width's inverse.
    """

    sigma: Array
    epsilon: Array
    alpha: Array
    kind: str = jmd_dataclasses.static_field()
    cutoff: float = jmd_dataclasses.static_field()
    onset: float = jmd_dataclasses.static_field()
    cutoff_mode: str = jmd_dataclasses.static_field()
    extra: Array | None = None
    damping: tuple[float, float] = dataclasses.field(default=(0.2, 2.0), metadata={"static": True})


def _tables(value, n: int = elements.N_ELEMENTS) -> np.ndarray:
    return np.broadcast_to(np.asarray(value, dtype=np.float64), (n, n)).copy()


def _check(kind: str, cutoff: float, onset: float | None, cutoff_mode: str) -> float:
    if kind not in KINDS:
        raise ValueError(f"unknown potential kind {kind!r}")
    if cutoff_mode not in ("smooth", "shift", "none"):
        raise ValueError(f"unknown cutoff_mode {cutoff_mode!r}")
    if onset is None:
        onset = 0.8 * cutoff
    if not 0.0 < onset < cutoff:
        raise ValueError(f"need 0 < onset < cutoff, got onset={onset}, cutoff={cutoff}")
    return float(onset)


def make_pair_potential(
    sigma,
    epsilon,
    alpha=2.0,
    *,
    kind: PotentialKind = "lj",
    cutoff: float = 8.0,
    onset: float | None = None,
    cutoff_mode: CutoffMode = "smooth",
) -> PairPotential:
    """Build a potential from scalars or ``[119, 119]`` tables (broadcast to tables).

    Args:
        sigma: Length parameter [A], scalar or ``[119, 119]``.
        epsilon: Energy scale [eV], scalar or ``[119, 119]``.
        alpha: Morse range [1/A] or soft-sphere exponent, scalar or ``[119, 119]``.
        kind: Pair function, see ``PairPotential``.
        cutoff: Cutoff [A].
        onset: Smooth-switch onset [A]; default ``0.8 * cutoff``.
        cutoff_mode: ``"smooth"``, ``"shift"`` or ``"none"``.

    Returns:
        ``PairPotential``. Its tables use JAX's default float precision at creation time, so
        create potentials after enabling float64 if you need it.
    """
    onset = _check(kind, cutoff, onset, cutoff_mode)
    return PairPotential(
        sigma=jnp.asarray(_tables(sigma)),
        epsilon=jnp.asarray(_tables(epsilon)),
        alpha=jnp.asarray(_tables(alpha)),
        kind=kind,
        cutoff=float(cutoff),
        onset=onset,
        cutoff_mode=cutoff_mode,
    )


def _uff_mixed(mixing: str) -> tuple[np.ndarray, np.ndarray]:
    x, d = elements.UFF_X, elements.UFF_D
    if mixing == "geometric":
        x_ij = np.sqrt(np.outer(x, x))
    elif mixing == "lorentz_berthelot":
        x_ij = 0.5 * (x[:, None] + x[None, :])
    else:
        raise ValueError(f"unknown mixing rule {mixing!r}")
    d_ij = np.sqrt(np.outer(d, d))
    missing = np.isnan(x_ij) | np.isnan(d_ij)
    # Elements without UFF parameters (padding Z=0, Z>103) do not interact.
    return np.where(missing, 3.0, x_ij), np.where(missing, 0.0, d_ij)


def uff_lennard_jones(
    cutoff: float = 8.0,
    onset: float | None = None,
    cutoff_mode: CutoffMode = "smooth",
    mixing: Literal["geometric", "lorentz_berthelot"] = "geometric",
) -> PairPotential:
    """UFF van der Waals Lennard-Jones potential for all elements Z = 1..103.

    ``V_ij(r) = 4 D_ij [(s_ij/r)^12 - (s_ij/r)^6]`` with ``s_ij = x_ij / 2^(1/6)``;
    Rappe et al., J. Am. Chem. Soc. 114, 10024 (1992), Table 1 (``x_i``, ``D_i``).

    Args:
        cutoff: Cutoff [A] (``2.5 sigma`` of O-O is 7.8 A).
        onset: Smooth-switch onset [A]; default ``0.8 * cutoff``.
        cutoff_mode: ``"smooth"``, ``"shift"`` or ``"none"``.
        mixing: ``"geometric"`` (UFF: ``x_ij = sqrt(x_i x_j)``) or ``"lorentz_berthelot"``
            (``x_ij = (x_i + x_j) / 2``); ``D_ij = sqrt(D_i D_j)`` in both.

    Returns:
        ``PairPotential`` of kind ``"lj"``.
    """
    x_ij, d_ij = _uff_mixed(mixing)
    return make_pair_potential(
        x_ij / 2.0 ** (1.0 / 6.0),
        d_ij,
        0.0,
        kind="lj",
        cutoff=cutoff,
        onset=onset,
        cutoff_mode=cutoff_mode,
    )


def uff_morse(
    cutoff: float = 8.0,
    onset: float | None = None,
    cutoff_mode: CutoffMode = "smooth",
    mixing: Literal["geometric", "lorentz_berthelot"] = "geometric",
    alpha_scale: float = 6.0,
) -> PairPotential:
    """Morse potential with UFF minima: ``V = D_ij (1 - exp(-a_ij (r - x_ij)))^2 - D_ij``.

    ``a_ij = alpha_scale / x_ij``; the default 6 gives the Lennard-Jones curvature at the
    minimum (``V'' = 72 eps / r_min^2 = 2 D a^2``), so both kinds share ``x_ij``, ``D_ij`` and
    harmonic stiffness and differ only in anharmonicity.

    Args:
        cutoff: Cutoff [A].
        onset: Smooth-switch onset [A]; default ``0.8 * cutoff``.
        cutoff_mode: ``"smooth"``, ``"shift"`` or ``"none"``.
        mixing: As in ``uff_lennard_jones``.
        alpha_scale: Dimensionless ``a_ij x_ij``.

    Returns:
        ``PairPotential`` of kind ``"morse"``.
    """
    x_ij, d_ij = _uff_mixed(mixing)
    return make_pair_potential(
        x_ij,
        d_ij,
        alpha_scale / x_ij,
        kind="morse",
        cutoff=cutoff,
        onset=onset,
        cutoff_mode=cutoff_mode,
    )


def covalent_soft_sphere(
    fraction: float = 0.6, stiffness: float = 1.0, exponent: float = 2.0
) -> PairPotential:
    """Short-range repulsion between atoms closer than ``fraction * (r_cov_i + r_cov_j)``.

    ``V = (epsilon / alpha) (1 - r / d_ij)^alpha`` for ``r < d_ij`` (jax-md ``soft_sphere``),
    ``d_ij = fraction (r_cov_i + r_cov_j)`` with Cordero covalent radii, ``epsilon_ij =
    stiffness * d_ij^2`` so that ``V = stiffness (d_ij - r)^2 / 2`` for ``alpha = 2`` (a spring
    of constant ``stiffness`` [eV/A^2] on the overlap). The cutoff is the largest ``d_ij``.

    Args:
        fraction: Minimum distance as a fraction of the covalent bond length. In Perov-5 the
            smallest interatomic distance is 0.68 of the covalent sum (0.1 % quantile 0.77).
        stiffness: Spring constant [eV/A^2] (``alpha = 2``).
        exponent: Soft-sphere exponent ``alpha``.

    Returns:
        ``PairPotential`` of kind ``"soft_sphere"`` (cutoff mode ``"none"``: ``V(d_ij) = 0``).
    """
    r = elements.COVALENT_RADIUS
    d_ij = fraction * (r[:, None] + r[None, :])
    return make_pair_potential(
        d_ij,
        stiffness * d_ij**2,
        exponent,
        kind="soft_sphere",
        cutoff=float(d_ij[1:, 1:].max()),
        onset=None,
        cutoff_mode="none",
    )


def _screened_coulomb(r: Array, damping: tuple[float, float]) -> Array:
    """``g(r) = [erf(b r) - erf(a r)] / r``: Gaussian charges (width ``1/b``), Wolf-damped
    (``a``); finite at ``r = 0`` (``2 (b - a) / sqrt(pi)``) so opposite charges cannot
    collapse onto each other."""
    a, b = damping
    small = r < 1e-3
    safe = jnp.where(small, 1.0, r)
    g = (jax.scipy.special.erf(b * safe) - jax.scipy.special.erf(a * safe)) / safe
    g0 = 2.0 / jnp.sqrt(jnp.pi) * ((b - a) - (b**3 - a**3) * r * r / 3.0)
    return jnp.where(small, g0, g)


def born_morse_coulomb_pair(
    r: Array,
    r0: Array,
    depth: Array,
    a: Array,
    born_a: Array,
    born_rho: Array,
    qq: Array,
    damping: tuple[float, float],
) -> Array:
    r"""``V(r) = A e^{-r/\rho} + D[(1 - e^{-a(r - r_0)})^2 - 1] + k_e q_i q_j g(r)`` [eV].

    Born-Mayer repulsion (ionic cores), a Morse bond (covalent / metallic cohesion) and a
    screened Coulomb term between fixed effective charges (`_screened_coulomb`); ``k_e`` is
    `COULOMB_K`. Without a cutoff treatment (``pair_energy`` applies it).
    """
    ex = jnp.exp(-a * (r - r0))
    return (
        born_a * jnp.exp(-r / born_rho)
        + depth * ((1.0 - ex) ** 2 - 1.0)
        + COULOMB_K * qq * _screened_coulomb(r, damping)
    )


def _raw_pair(
    kind: str,
    r: Array,
    sigma: Array,
    epsilon: Array,
    alpha: Array,
    extra: tuple[Array, Array, Array] | None = None,
    damping: tuple[float, float] = (0.2, 2.0),
) -> Array:
    if kind == "born_morse_coulomb":
        return born_morse_coulomb_pair(r, sigma, epsilon, alpha, *extra, damping)
    if kind == "lj":
        return jmd_energy.lennard_jones(r, sigma, epsilon)
    if kind == "morse":
        return jmd_energy.morse(r, sigma, epsilon, alpha)
    if kind == "soft_sphere":
        return jmd_energy.soft_sphere(r, sigma, epsilon, alpha)
    raise ValueError(f"unknown potential kind {kind!r}")


def smooth_switch(r: Array, onset: float, cutoff: float) -> Array:
    """C^1 switch ``S(r)``: 1 below ``onset``, 0 beyond ``cutoff`` (HOOMD-blue / jax-md / ASE)."""
    rc2, ro2, r2 = cutoff**2, onset**2, r * r
    inner = (rc2 - r2) ** 2 * (rc2 + 2.0 * r2 - 3.0 * ro2) / (rc2 - ro2) ** 3
    return jnp.where(r < onset, 1.0, jnp.where(r < cutoff, inner, 0.0)).astype(r.dtype)


def pair_energy(potential: PairPotential, r: Array, z_i: Array, z_j: Array) -> Array:
    """Pair energy ``V_{Z_i Z_j}(r)`` [eV] with the potential's cutoff treatment.

    Args:
        potential: ``PairPotential``.
        r: ``[...]`` distances [A] (must be > 0; mask zero-length pairs before calling).
        z_i: Atomic numbers broadcastable to ``r``.
        z_j: Atomic numbers broadcastable to ``r``.

    Returns:
        ``[...]`` pair energies [eV].
    """
    dtype = r.dtype
    sigma = potential.sigma[z_i, z_j].astype(dtype)
    eps = potential.epsilon[z_i, z_j].astype(dtype)
    alpha = potential.alpha[z_i, z_j].astype(dtype)
    extra = None
    if potential.kind == "born_morse_coulomb":
        extra = tuple(potential.extra[k][z_i, z_j].astype(dtype) for k in range(3))
    v = _raw_pair(potential.kind, r, sigma, eps, alpha, extra, potential.damping)
    inside = r < potential.cutoff
    if potential.cutoff_mode == "smooth":
        return v * smooth_switch(r, potential.onset, potential.cutoff)
    if potential.cutoff_mode == "shift":
        rc = jnp.full_like(r, potential.cutoff)
        v_rc = _raw_pair(potential.kind, rc, sigma, eps, alpha, extra, potential.damping)
        return jnp.where(inside, v - v_rc, 0.0)
    return jnp.where(inside, v, 0.0)


def _pair_energies(
    pairs: DensePairs, numbers: Array, potential: PairPotential
) -> Array:  # [N, N, S]
    v = pair_energy(potential, pairs.dist, numbers[:, None, None], numbers[None, :, None])
    return jnp.where(pairs.valid, v, 0.0)


@partial(jax.jit, static_argnames=("n_images",))
def atomic_energies(
    cell: Array,  # [3, 3]
    frac: Array,  # [N, 3]
    numbers: Array,  # [N] int
    atom_mask: Array | None = None,  # [N] bool
    *,
    potential: PairPotential,
    n_images: tuple[int, int, int],
) -> Array:
    """Per-atom energies ``E_i = 1/2 sum_{j,k} V(r_ij^k)`` [eV], zero for padded atoms.

    Args:
        cell: ``[3, 3]`` rows are lattice vectors [A].
        frac: ``[N, 3]`` fractional coordinates.
        numbers: ``[N]`` atomic numbers (anything for padded atoms).
        atom_mask: ``[N]`` bool, True for real atoms; None means all real.
        potential: ``PairPotential``.
        n_images: Static image stencil ``(n1, n2, n3)`` covering ``potential.cutoff``
            (``images.n_images_for_cutoff``).

    Returns:
        ``[N]`` energies [eV]; their sum is the total energy.
    """
    pairs = dense_pairs(cell, frac, atom_mask, n_images)
    return 0.5 * jnp.sum(_pair_energies(pairs, numbers, potential), axis=(1, 2))


@partial(jax.jit, static_argnames=("n_images",))
def energy(
    cell: Array,  # [3, 3]
    frac: Array,  # [N, 3]
    numbers: Array,  # [N] int
    atom_mask: Array | None = None,  # [N] bool
    *,
    potential: PairPotential,
    n_images: tuple[int, int, int],
) -> Array:
    """Total pair energy ``E = 1/2 sum_{i,j,k}' V(r_ij^k)`` [eV] of one (padded) structure.

    Args:
        cell: ``[3, 3]`` rows are lattice vectors [A].
        frac: ``[N, 3]`` fractional coordinates.
        numbers: ``[N]`` atomic numbers.
        atom_mask: ``[N]`` bool, True for real atoms; None means all real.
        potential: ``PairPotential``.
        n_images: Static image stencil covering the cutoff.

    Returns:
        Scalar energy [eV]. Differentiable in ``cell`` and ``frac``.
    """
    return jnp.sum(
        atomic_energies(cell, frac, numbers, atom_mask, potential=potential, n_images=n_images)
    )


def cell_volume(cell: Array) -> Array:
    """Cell volume ``|det(cell)|`` [A^3]; ``[..., 3, 3] -> [...]``."""
    return jnp.abs(jnp.linalg.det(cell))


@partial(jax.jit, static_argnames=("n_images",))
def energy_forces_stress(
    cell: Array,  # [3, 3]
    frac: Array,  # [N, 3]
    numbers: Array,  # [N] int
    atom_mask: Array | None = None,  # [N] bool
    *,
    potential: PairPotential,
    n_images: tuple[int, int, int],
) -> tuple[Array, Array, Array]:
    """Energy, forces and stress of one structure from a single reverse-mode pass.

    ``F = -dE/d cart = -(dE/d frac) cell^{-T}``; ``sigma = (1/V) dE(cell (I + eps), f)/d eps``.

    Args:
        cell: ``[3, 3]`` rows are lattice vectors [A].
        frac: ``[N, 3]`` fractional coordinates.
        numbers: ``[N]`` atomic numbers.
        atom_mask: ``[N]`` bool; forces of padded atoms are zero.
        potential: ``PairPotential``.
        n_images: Static image stencil covering the cutoff.

    Returns:
        ``(energy [eV], forces [N, 3] eV/A, stress [3, 3] eV/A^3)`` (ASE sign convention; ASE's
        Voigt order is ``xx, yy, zz, yz, xz, xy``).
    """
    eye = jnp.eye(3, dtype=cell.dtype)

    def e_fn(f, eps):
        return energy(
            cell @ (eye + eps), f, numbers, atom_mask, potential=potential, n_images=n_images
        )

    e, (g_frac, g_eps) = jax.value_and_grad(e_fn, argnums=(0, 1))(frac, jnp.zeros_like(cell))
    forces = -jnp.linalg.solve(cell, g_frac.T).T
    if atom_mask is not None:
        forces = jnp.where(atom_mask[:, None], forces, 0.0)
    stress = g_eps / cell_volume(cell)
    return e, forces, stress


def forces(
    cell: Array,
    frac: Array,
    numbers: Array,
    atom_mask: Array | None = None,
    *,
    potential: PairPotential,
    n_images: tuple[int, int, int],
) -> Array:
    """Forces ``-dE/d cart`` [eV/A], ``[N, 3]``; see ``energy_forces_stress``."""
    return energy_forces_stress(
        cell, frac, numbers, atom_mask, potential=potential, n_images=n_images
    )[1]


def stress(
    cell: Array,
    frac: Array,
    numbers: Array,
    atom_mask: Array | None = None,
    *,
    potential: PairPotential,
    n_images: tuple[int, int, int],
) -> Array:
    """Stress ``(1/V) dE/d eps`` [eV/A^3], ``[3, 3]``; see ``energy_forces_stress``."""
    return energy_forces_stress(
        cell, frac, numbers, atom_mask, potential=potential, n_images=n_images
    )[2]


@partial(jax.jit, static_argnames=("n_images",))
def batch_energy_forces_stress(
    cell: Array,  # [B, 3, 3]
    frac: Array,  # [B, N, 3]
    numbers: Array,  # [B, N]
    atom_mask: Array,  # [B, N] bool
    *,
    potential: PairPotential,
    n_images: tuple[int, int, int],
) -> tuple[Array, Array, Array]:
    """``energy_forces_stress`` vmapped over a padded batch.

    Args:
        cell: ``[B, 3, 3]`` [A].
        frac: ``[B, N, 3]``.
        numbers: ``[B, N]``.
        atom_mask: ``[B, N]`` bool.
        potential: ``PairPotential`` (shared).
        n_images: Static stencil covering the cutoff for every cell of the batch.

    Returns:
        ``(energy [B] eV, forces [B, N, 3] eV/A, stress [B, 3, 3] eV/A^3)``.
    """
    fn = partial(energy_forces_stress, potential=potential, n_images=n_images)
    return jax.vmap(fn)(cell, frac, numbers, atom_mask)


@partial(jax.jit, static_argnames=("n_images",))
def batch_energy(
    cell: Array,  # [B, 3, 3]
    frac: Array,  # [B, N, 3]
    numbers: Array,  # [B, N]
    atom_mask: Array,  # [B, N] bool
    *,
    potential: PairPotential,
    n_images: tuple[int, int, int],
) -> Array:
    """``energy`` vmapped over a padded batch: ``[B]`` energies [eV]."""
    fn = partial(energy, potential=potential, n_images=n_images)
    return jax.vmap(fn)(cell, frac, numbers, atom_mask)
