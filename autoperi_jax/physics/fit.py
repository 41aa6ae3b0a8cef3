r"""Fitting a `fitted.FittedPotential` to labelled structures (energies, forces, stresses).

Loss (full batch, minimised with optax L-BFGS and a zoom line search):

.. math::

    L = w_E \langle (\Delta E / n)^2 \rangle_{\rm structures}
      + w_F \langle \Delta F^2 \rangle_{\rm atoms,\ components}
      + w_S \langle \Delta\sigma^2 \rangle_{\rm structures,\ components}
      + \lambda\, \| \theta - \theta_{\rm init} \|^2,

energies per atom in eV, forces in eV/A, stresses in GPa; ``theta`` are the unconstrained
per-element parameters (logarithms of ``A, rho, D, a, R``; ``q`` and ``e0`` as they are) of
the elements present in the data (the others keep their start values), and the small
``lambda`` keeps parameters the data hardly constrains near their start. Forces in the loss
are ``-dE/dx`` by autodiff, so its gradient is a second derivative of the pair sum.

The data enter as one flat list of periodic edges (`EdgeSet`, built once on the host with
ASE's neighbour list): the positions are fixed, so forces and stresses follow from the
radial derivative ``V'(r)`` of each edge (a forward-mode derivative), and the loss gradient
needs no second derivative through the geometry. One compile, no padding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax_md import dataclasses as jmd_dataclasses

from autoperi_jax.physics import elements
from autoperi_jax.physics.fitted import (
    PARAM_NAMES,
    ElementParams,
    FittedPotential,
    default_element_params,
    element_tables,
)
from autoperi_jax.physics.potentials import pair_energy

Array = jax.Array
EV_A3_TO_GPA = 160.21766208
_LOG = ("born_a", "born_rho", "morse_depth", "morse_a", "radius")


@dataclasses.dataclass(frozen=True)
class Labelled:
    """One labelled structure (host NumPy).

    Attributes:
      cell: ``[3, 3]`` rows = lattice vectors [A].
      frac: ``[n, 3]`` fractional coordinates.
      numbers: ``[n]`` atomic numbers.
      energy: total energy [eV].
      forces: ``[n, 3]`` [eV/A].
      stress: ``[3, 3]`` [eV/A^3], ASE sign (negative under compression).
    """

    cell: np.ndarray
    frac: np.ndarray
    numbers: np.ndarray
    energy: float
    forces: np.ndarray
    stress: np.ndarray


@jmd_dataclasses.dataclass
class EdgeSet:
    """Labelled structures flattened into one list of periodic edges (pytree; host-built).

    Positions are data, not parameters, so a fit needs no autodiff through geometry: with
    ``d`` the edge vector from atom ``i`` to an image of ``j`` within the cutoff (both
    directions listed), ``E = 1/2 sum V``, ``F_i = sum_j V'(r) d / r`` and
    ``sigma = 1/(2 Vol) sum V'(r)/r d d^T`` (ASE sign), the same quantities
    `potentials.energy_forces_stress` gets by autodiff (a test checks they agree).
    """

    r: Array  # [E] A
    d: Array  # [E, 3] A
    z_i: Array  # [E] int
    z_j: Array  # [E] int
    atom: Array  # [E] int, global index of atom i
    struct: Array  # [E] int, structure of the edge
    numbers: Array  # [A] int, all atoms
    atom_struct: Array  # [A] int
    n_atoms: Array  # [S]
    volume: Array  # [S] A^3
    energy: Array  # [S] eV
    forces: Array  # [A, 3] eV/A
    stress: Array  # [S, 3, 3] eV/A^3


def make_edges(data: Sequence[Labelled], cutoff: float, dtype=jnp.float32) -> EdgeSet:
    """`EdgeSet` of ``data`` (ASE's neighbour list over all periodic images)."""
    from ase import Atoms
    from ase.neighborlist import neighbor_list

    cols: dict[str, list] = {k: [] for k in ("r", "d", "zi", "zj", "atom", "struct")}
    offset = 0
    for s, x in enumerate(data):
        atoms = Atoms(numbers=x.numbers, cell=x.cell, scaled_positions=x.frac, pbc=True)
        i, j, r, d = neighbor_list("ijdD", atoms, cutoff, self_interaction=False)
        z = np.asarray(x.numbers, int)
        cols["r"].append(r)
        cols["d"].append(d)
        cols["zi"].append(z[i])
        cols["zj"].append(z[j])
        cols["atom"].append(i + offset)
        cols["struct"].append(np.full(len(i), s))
        offset += len(z)
    cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}
    return EdgeSet(
        r=jnp.asarray(cat["r"], dtype),
        d=jnp.asarray(cat["d"].reshape(-1, 3), dtype),
        z_i=jnp.asarray(cat["zi"], jnp.int32),
        z_j=jnp.asarray(cat["zj"], jnp.int32),
        atom=jnp.asarray(cat["atom"], jnp.int32),
        struct=jnp.asarray(cat["struct"], jnp.int32),
        numbers=jnp.asarray(np.concatenate([x.numbers for x in data]), jnp.int32),
        atom_struct=jnp.asarray(
            np.concatenate([np.full(len(x.numbers), s) for s, x in enumerate(data)]), jnp.int32
        ),
        n_atoms=jnp.asarray([len(x.numbers) for x in data], dtype),
        volume=jnp.asarray([abs(np.linalg.det(x.cell)) for x in data], dtype),
        energy=jnp.asarray([x.energy for x in data], dtype),
        forces=jnp.asarray(np.concatenate([x.forces for x in data]).reshape(-1, 3), dtype),
        stress=jnp.asarray(np.stack([x.stress for x in data]), dtype),
    )


def to_raw(params: ElementParams, e0) -> dict[str, Array]:
    """Unconstrained parameters: logs of the positive ones, ``charge`` and ``e0`` as they are."""
    raw = {k: jnp.log(jnp.asarray(getattr(params, k))) for k in _LOG}
    raw["charge"] = jnp.asarray(params.charge)
    raw["e0"] = jnp.asarray(e0)
    return raw


def from_raw(raw: Mapping[str, Array]) -> tuple[ElementParams, Array]:
    """Inverse of `to_raw`: ``(ElementParams, e0)``."""
    p = {k: jnp.exp(raw[k]) for k in _LOG}
    p["charge"] = raw["charge"]
    return ElementParams(**p), raw["e0"]


@dataclasses.dataclass(frozen=True)
class FitSettings:
    """Loss weights and optimiser settings (recorded in the potential's metadata).

    Attributes:
      w_energy: weight of the squared energy error per atom [eV^2].
      w_forces: weight of the squared force component error [(eV/A)^2].
      w_stress: weight of the squared stress component error [GPa^2].
      prior: ``lambda`` of the pull toward the start values (unconstrained parameters).
      steps: L-BFGS iterations.
      trainable: which of ``PARAM_NAMES`` (and ``e0``) are fitted; the others stay fixed.
      cutoff: pair cutoff [A]; onset ``cutoff - 1``.
      damping: Coulomb ``(alpha_c, b)`` [1/A].
      charge_start: start charges as this share of `formal_charges` (without ``init``).
    """

    w_energy: float = 1.0
    w_forces: float = 1.0
    w_stress: float = 0.01
    prior: float = 1e-4
    steps: int = 300
    trainable: tuple[str, ...] = (*PARAM_NAMES, "e0")
    cutoff: float = 6.0
    damping: tuple[float, float] = (0.2, 2.0)
    charge_start: float = 0.5


def formal_charges() -> np.ndarray:
    """``[119]`` each element's first common oxidation state (pymatgen; 0 where none)."""
    import warnings

    from pymatgen.core.periodic_table import Element

    out = np.zeros(elements.N_ELEMENTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for z in range(1, 104):
            states = Element.from_Z(z).common_oxidation_states
            out[z] = states[0] if states else 0.0
    return out


def edge_predict(raw, edges: EdgeSet, cutoff: float, damping) -> tuple[Array, Array, Array]:
    """``(energy [S] eV, forces [A, 3] eV/A, stress [S, 3, 3] eV/A^3)`` from `EdgeSet`."""
    p, e0 = from_raw(raw)
    pot = element_tables(p, cutoff, None, damping)
    n_s, n_a = edges.energy.shape[0], edges.numbers.shape[0]

    def v_fn(r):
        return pair_energy(pot, r, edges.z_i, edges.z_j)

    v, dv = jax.jvp(v_fn, (edges.r,), (jnp.ones_like(edges.r),))
    e = 0.5 * jax.ops.segment_sum(v, edges.struct, n_s)
    e = e + jax.ops.segment_sum(e0[edges.numbers], edges.atom_struct, n_s)
    pair_f = (dv / edges.r)[:, None] * edges.d
    f = jax.ops.segment_sum(pair_f, edges.atom, n_a)
    vir = 0.5 * pair_f[:, :, None] * edges.d[:, None, :]
    s = jax.ops.segment_sum(vir, edges.struct, n_s) / edges.volume[:, None, None]
    return e, f, s


def _sq_errors(raw, edges: EdgeSet, cutoff, damping):
    """Sums of squared errors: energy per atom, force components, stress components [GPa]."""
    e, f, s = edge_predict(raw, edges, cutoff, damping)
    se = jnp.sum(((e - edges.energy) / edges.n_atoms) ** 2)
    sf = jnp.sum((f - edges.forces) ** 2)
    ss = jnp.sum(((s - edges.stress) * EV_A3_TO_GPA) ** 2)
    return se, sf, ss


def present_elements(data: Sequence[Labelled]) -> np.ndarray:
    """``[119]`` bool: elements occurring in ``data``."""
    out = np.zeros(elements.N_ELEMENTS, bool)
    for d in data:
        out[np.asarray(d.numbers, int)] = True
    return out


def fit(
    train: Sequence[Labelled],
    settings: FitSettings = FitSettings(),
    init: FittedPotential | None = None,
    progress: bool = True,
    dtype=jnp.float32,
) -> tuple[FittedPotential, list[float]]:
    """Fits per-element parameters to ``train`` (module docstring).

    Args:
      train: labelled structures.
      settings: `FitSettings`.
      init: start values (default: `fitted.default_element_params`, ``e0`` from a
        least-squares fit of the energies to the composition).
      progress: progress bar.
      dtype: float precision of the data (parameters follow JAX's default).

    Returns:
      ``(potential, loss history)``; ``potential.meta`` is empty (the caller records it).
    """
    import optax
    from tqdm import tqdm

    present = present_elements(train)
    if init is None:
        params = default_element_params()
        # q = 0 is a saddle of the loss (charges enter as products q_i q_j): start from
        # half the most common oxidation state instead
        params.charge[:] = settings.charge_start * formal_charges()
        e0 = composition_offsets(train)
    else:
        params, e0 = init.params, init.e0
    raw0 = to_raw(params, e0)
    raw0 = {k: jnp.asarray(v, dtype) for k, v in raw0.items()}
    edges = make_edges(train, settings.cutoff, dtype)
    n_struct = len(train)
    n_comp = 3 * sum(len(d.numbers) for d in train)
    train_mask = {
        k: jnp.asarray(present & (k in settings.trainable), dtype) for k in (*PARAM_NAMES, "e0")
    }
    cutoff, damping = settings.cutoff, settings.damping

    def loss(raw):
        raw = {k: raw0[k] + train_mask[k] * (raw[k] - raw0[k]) for k in raw}
        se, sf, ss = _sq_errors(raw, edges, cutoff, damping)
        reg = sum(jnp.sum(train_mask[k] * (raw[k] - raw0[k]) ** 2) for k in _LOG)
        return (
            settings.w_energy * se / n_struct
            + settings.w_forces * sf / n_comp
            + settings.w_stress * ss / (9 * n_struct)
            + settings.prior * reg
        )

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    @jax.jit
    def step(raw, state):
        value, grad = value_and_grad(raw, state=state)
        grad = {k: grad[k] * train_mask[k] for k in grad}
        updates, state = opt.update(grad, state, raw, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(raw, updates), state, value

    raw, state = raw0, opt.init(raw0)
    history = []
    bar = tqdm(range(settings.steps), disable=not progress, desc="fit", unit="step")
    for _ in bar:
        raw, state, value = step(raw, state)
        history.append(float(value))
        bar.set_postfix(loss=f"{history[-1]:.5g}")
        if not np.isfinite(history[-1]):
            raise FloatingPointError(f"loss became {history[-1]} after {len(history)} steps")
    raw = {k: raw0[k] + train_mask[k] * (raw[k] - raw0[k]) for k in raw}
    p, e0_fit = from_raw(raw)
    out = FittedPotential(
        params=ElementParams(**{k: np.asarray(getattr(p, k), np.float64) for k in PARAM_NAMES}),
        e0=np.where(present, np.asarray(e0_fit, np.float64), 0.0),
        fitted=present,
        cutoff=settings.cutoff,
        onset=settings.cutoff - 1.0,
        damping=settings.damping,
    )
    return out, history


def composition_offsets(data: Sequence[Labelled]) -> np.ndarray:
    """``[119]`` per-element energies [eV/atom] minimising ``sum (E - sum_i e0[Z_i])^2``."""
    present = np.flatnonzero(present_elements(data))
    col = {z: k for k, z in enumerate(present)}
    a = np.zeros((len(data), len(present)))
    for r, d in enumerate(data):
        for z in d.numbers:
            a[r, col[int(z)]] += 1
    sol = np.linalg.lstsq(a, np.array([d.energy for d in data]), rcond=None)[0]
    e0 = np.zeros(elements.N_ELEMENTS)
    e0[present] = sol
    return e0


def predict(
    potential: FittedPotential, data: Sequence[Labelled], dtype=jnp.float32
) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """``(energy [eV], forces [n, 3], stress [3, 3] eV/A^3)`` per structure, in input order."""
    raw = {k: jnp.asarray(v, dtype) for k, v in to_raw(potential.params, potential.e0).items()}
    edges = make_edges(data, potential.cutoff, dtype)
    e, f, s = jax.device_get(
        jax.jit(partial(edge_predict, cutoff=potential.cutoff, damping=potential.damping))(
            raw, edges
        )
    )
    out, start = [], 0
    for k, d in enumerate(data):
        n = len(d.numbers)
        out.append((float(e[k]), np.asarray(f[start : start + n]), np.asarray(s[k])))
        start += n
    return out


def errors(potential: FittedPotential, data: Sequence[Labelled]) -> dict[str, float]:
    """Mean absolute errors against the labels: ``energy_mae_per_atom`` [eV/atom],
    ``force_mae`` [eV/A, per component], ``stress_mae_gpa`` [GPa, per component], plus
    ``force_rmse`` and ``n_structures``."""
    pred = predict(potential, data)
    de = [abs(p[0] - d.energy) / len(d.numbers) for p, d in zip(pred, data)]
    df = np.concatenate([(p[1] - d.forces).ravel() for p, d in zip(pred, data)])
    ds = np.concatenate([(p[2] - d.stress).ravel() * EV_A3_TO_GPA for p, d in zip(pred, data)])
    return {
        "energy_mae_per_atom": float(np.mean(de)),
        "force_mae": float(np.mean(np.abs(df))),
        "force_rmse": float(np.sqrt(np.mean(df**2))),
        "stress_mae_gpa": float(np.mean(np.abs(ds))),
        "n_structures": len(data),
    }
