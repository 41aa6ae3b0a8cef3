r"""Pair potentials with per-element parameters, fitted to an MLIP (CHGNet), stored as JSON.

Form (kind ``"born_morse_coulomb"`` of `potentials.PairPotential`, smooth cutoff):

.. math::

    V_{ij}(r) = A_{ij} e^{-r/\rho_{ij}}
              + D_{ij}\big[(1 - e^{-a_{ij}(r - r_{0,ij})})^2 - 1\big]
              + k_e\, q_i q_j\, \frac{\mathrm{erf}(b r) - \mathrm{erf}(\alpha_c r)}{r}

Born-Mayer repulsion of the ionic cores, a Morse bond for covalent / metallic cohesion and a
Coulomb term between fixed effective charges, spread as Gaussians (``1/b`` wide: no
collapse of opposite charges at ``r -> 0``) and Wolf-damped (``alpha_c``) so that it is
short-ranged enough for a cutoff, all multiplied by the C^1 switch of `potentials`. Pair
parameters come from per-element ones by mixing rules, so every pair of the 118 elements
has one (unseen pairs included) and the tables are symmetric by construction:

* ``A_ij = sqrt(A_i A_j)``, ``rho_ij = (rho_i + rho_j) / 2`` (Born-Mayer; Gilbert-style),
* ``D_ij = sqrt(D_i D_j)``, ``a_ij = (a_i + a_j) / 2``, ``r0_ij = R_i + R_j`` (additive
  radii, as UFF's bond lengths),
* ``q_i q_j`` (point charges).

The total energy adds a per-element reference energy ``e0_i`` (the MLIP's energies are on
the Materials Project scale, the pair sum goes to 0 for separated atoms); it changes no
force, stress or phonon. `FittedPotential` holds the per-element values (host NumPy) and the
fit's metadata; `element_tables` / `mix` build the ``PairPotential`` (differentiable in the
per-element values, which is how `physics.fit` fits them); `load_potential` reads a JSON
file or a shipped name (``"fitted_chgnet"``, ``autoperi_jax/pretrained/potentials/``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax_md import dataclasses as jmd_dataclasses

from autoperi_jax.physics import elements
from autoperi_jax.physics.potentials import PairPotential

Array = jax.Array

#: Per-element parameters, in this order (units: eV, A, eV, 1/A, A, e).
PARAM_NAMES = ("born_a", "born_rho", "morse_depth", "morse_a", "radius", "charge")
#: Where the shipped fitted potentials live (``<name>.json``).
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "pretrained" / "potentials"
FORMAT = "autoperi-fitted-pair-potential/1"


@jmd_dataclasses.dataclass
class ElementParams:
    """Per-element parameters, each ``[119]`` (index = atomic number; pytree leaves).

    Attributes:
      born_a: Born-Mayer prefactor ``A_i`` [eV] (> 0).
      born_rho: Born-Mayer decay length ``rho_i`` [A] (> 0).
      morse_depth: Morse well depth ``D_i`` [eV] (>= 0).
      morse_a: Morse range ``a_i`` [1/A] (> 0).
      radius: Morse radius ``R_i`` [A] (``r0_ij = R_i + R_j``).
      charge: Effective charge ``q_i`` [e].
    """

    born_a: Array
    born_rho: Array
    morse_depth: Array
    morse_a: Array
    radius: Array
    charge: Array


def default_element_params() -> ElementParams:
    """Start values for every element: covalent radii, a weak Morse bond, no charge."""
    n = elements.N_ELEMENTS
    radius = np.nan_to_num(elements.COVALENT_RADIUS, nan=1.5).astype(np.float64)
    radius = np.where(radius > 0, radius, 1.5)
    return ElementParams(
        born_a=np.full(n, 300.0),
        born_rho=np.full(n, 0.3),
        morse_depth=np.full(n, 0.3),
        morse_a=np.full(n, 1.5),
        radius=radius,
        charge=np.zeros(n),
    )


def mix(p: ElementParams) -> tuple[Array, Array, Array, Array]:
    """Mixing rules (module docstring): ``(sigma, epsilon, alpha, extra)`` pair tables.

    Returns:
      ``r0 [119, 119]``, ``D [119, 119]``, ``a [119, 119]`` and ``extra [3, 119, 119]``
      (``A``, ``rho``, ``q_i q_j``), the table layout of kind ``"born_morse_coulomb"``.
    """

    def outer_mean(x):
        return 0.5 * (x[:, None] + x[None, :])

    born_a = jnp.sqrt(jnp.asarray(p.born_a)[:, None] * jnp.asarray(p.born_a)[None, :])
    depth = jnp.sqrt(jnp.asarray(p.morse_depth)[:, None] * jnp.asarray(p.morse_depth)[None, :])
    q = jnp.asarray(p.charge)
    extra = jnp.stack([born_a, outer_mean(jnp.asarray(p.born_rho)), q[:, None] * q[None, :]])
    r0 = jnp.asarray(p.radius)[:, None] + jnp.asarray(p.radius)[None, :]
    return r0, depth, outer_mean(jnp.asarray(p.morse_a)), extra


def element_tables(
    p: ElementParams,
    cutoff: float = 6.0,
    onset: float | None = None,
    damping: tuple[float, float] = (0.2, 2.0),
) -> PairPotential:
    """The ``PairPotential`` of per-element parameters (differentiable in ``p``; jit-able).

    Args:
      p: `ElementParams` (NumPy or JAX ``[119]`` arrays).
      cutoff: Cutoff [A] (smooth switch).
      onset: Switch onset [A]; default ``cutoff - 1``.
      damping: ``(alpha_c, b)`` [1/A] of the Coulomb term.

    Returns:
      ``PairPotential`` of kind ``"born_morse_coulomb"``, cutoff mode ``"smooth"``.
    """
    onset = cutoff - 1.0 if onset is None else onset
    if not 0.0 < onset < cutoff:
        raise ValueError(f"need 0 < onset < cutoff, got onset={onset}, cutoff={cutoff}")
    r0, depth, a, extra = mix(p)
    return PairPotential(
        sigma=r0,
        epsilon=depth,
        alpha=a,
        kind="born_morse_coulomb",
        cutoff=float(cutoff),
        onset=float(onset),
        cutoff_mode="smooth",
        extra=extra,
        damping=(float(damping[0]), float(damping[1])),
    )


@dataclasses.dataclass(frozen=True)
class FittedPotential:
    """A fitted potential: per-element parameters, reference energies, settings, metadata.

    Attributes:
      params: `ElementParams` of NumPy ``[119]`` float64 arrays.
      e0: ``[119]`` reference energy per element [eV/atom] (0 for elements never fitted).
      fitted: ``[119]`` bool, elements present in the fitting data.
      cutoff: Cutoff [A].
      onset: Switch onset [A].
      damping: Coulomb ``(alpha_c, b)`` [1/A].
      meta: What it was fitted to and how well (data, weights, held-out errors).
    """

    params: ElementParams
    e0: np.ndarray
    fitted: np.ndarray
    cutoff: float = 6.0
    onset: float = 5.0
    damping: tuple[float, float] = (0.2, 2.0)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def potential(self) -> PairPotential:
        """The ``PairPotential`` (JAX default float precision at call time)."""
        p = ElementParams(**{k: jnp.asarray(getattr(self.params, k)) for k in PARAM_NAMES})
        return element_tables(p, self.cutoff, self.onset, self.damping)

    def reference_energy(self, numbers) -> float:
        """``sum_i e0[Z_i]`` [eV] of one structure (host)."""
        return float(np.sum(self.e0[np.asarray(numbers, int)]))

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict: per-element values keyed by symbol for the fitted elements, one
        ``default`` entry for all others (the values every unfitted element carries)."""
        from ase.data import chemical_symbols

        idx = np.flatnonzero(self.fitted)
        per = {
            chemical_symbols[z]: {
                **{k: float(getattr(self.params, k)[z]) for k in PARAM_NAMES},
                "e0": float(self.e0[z]),
            }
            for z in idx
        }
        unfit = np.flatnonzero(~self.fitted)
        z0 = int(unfit[unfit > 0][0]) if np.any(unfit > 0) else 0
        default = {k: float(getattr(self.params, k)[z0]) for k in PARAM_NAMES if k != "radius"}
        return {
            "format": FORMAT,
            "form": "born_morse_coulomb",
            "cutoff": self.cutoff,
            "onset": self.onset,
            "damping": list(self.damping),
            "mixing": {
                "born_a": "geometric",
                "born_rho": "arithmetic",
                "morse_depth": "geometric",
                "morse_a": "arithmetic",
                "radius": "additive (r0_ij = R_i + R_j)",
                "charge": "product",
            },
            "elements": per,
            "default": {**default, "radius": "covalent radius (Cordero)", "e0": 0.0},
            "meta": self.meta,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Writes `to_json` (no pickle)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_json(), indent=1, sort_keys=False) + "\n")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FittedPotential:
        """Inverse of `to_json`."""
        from ase.data import atomic_numbers

        if data.get("format") != FORMAT:
            raise ValueError(f"not a fitted pair potential (format {data.get('format')!r})")
        base = default_element_params()
        d = data["default"]
        arrays = {k: np.array(getattr(base, k), np.float64) for k in PARAM_NAMES}
        for k in PARAM_NAMES:
            if k != "radius":
                arrays[k][:] = float(d[k])
        e0 = np.zeros(elements.N_ELEMENTS)
        fitted = np.zeros(elements.N_ELEMENTS, bool)
        for sym, vals in data["elements"].items():
            z = atomic_numbers[sym]
            for k in PARAM_NAMES:
                arrays[k][z] = float(vals[k])
            e0[z], fitted[z] = float(vals["e0"]), True
        return cls(
            params=ElementParams(**arrays),
            e0=e0,
            fitted=fitted,
            cutoff=float(data["cutoff"]),
            onset=float(data["onset"]),
            damping=(float(data["damping"][0]), float(data["damping"][1])),
            meta=dict(data.get("meta", {})),
        )


def shipped_potentials() -> list[str]:
    """Names of the fitted potentials shipped in the package."""
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.json"))


def load_fitted(name_or_path: str | os.PathLike) -> FittedPotential:
    """A `FittedPotential` from a JSON path or a shipped name (e.g. ``"fitted_chgnet"``)."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = SHIPPED_DIR / f"{name_or_path}.json"
        if not path.exists():
            raise FileNotFoundError(
                f"no shipped potential {name_or_path!r}; shipped: {shipped_potentials()}"
            )
    return FittedPotential.from_json(json.loads(path.read_text()))


def load_potential(name_or_path: str | os.PathLike) -> PairPotential:
    """The ``PairPotential`` of `load_fitted` (what ``potential="fitted_chgnet"`` means)."""
    return load_fitted(name_or_path).potential()
