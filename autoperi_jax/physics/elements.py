"""Per-element tables used by the physics module (numpy, host side, indexed by atomic number).

Every table is a float64 numpy array of length ``N_ELEMENTS = 119`` indexed by the atomic
number ``Z`` (index 0 is the padding "element" of padded batches). Missing values are ``nan``;
the ``HAS_*`` boolean arrays say where a value exists. Sources:

* ``UFF_X`` [A], ``UFF_D`` [eV]: Universal Force Field non-bonded (van der Waals) distance
  ``x_i`` and well depth ``D_i`` of Rappe, Casewit, Colwell, Goddard & Skiff, "UFF, a full
  periodic table force field for molecular mechanics and molecular dynamics simulations",
  J. Am. Chem. Soc. 114, 10024 (1992), Table 1. One value per element (every UFF atom type of
  an element shares x_i and D_i). ``D_i`` is tabulated in kcal/mol and converted with
  ``KCAL_PER_MOL_TO_EV``. The numbers were transcribed from two independent public
  implementations of that table (DFTB+ ``dispuffdata`` and the UFF4MOF/RDKit parameter list);
  they agree for all 103 elements except Ca, where DFTB+ has 3.999 A and the paper, RDKit and
  UFF4MOF have 3.399 A (used here).
* ``PAULING_CHI``: Pauling electronegativity as tabulated by pymatgen (``Element.X``), which
  follows the CRC Handbook values; nan for He, Ne, Ar and Z > 103.
* ``CATION_RADIUS`` / ``ANION_RADIUS`` [A]: Shannon crystal radii (R. D. Shannon, Acta Cryst.
  A32, 751 (1976)) as tabulated by pymatgen (``Element.average_cationic_radius`` /
  ``average_anionic_radius``: the average over the positive / negative oxidation states with
  data, six-fold coordination). nan where no such ion is tabulated.
* ``COVALENT_RADIUS`` [A]: single-bond covalent radii of Cordero et al., Dalton Trans. 2832
  (2008), from ``ase.data.covalent_radii``.
* ``ATOMIC_MASS`` [amu]: standard atomic weights from ``ase.data.atomic_masses`` (IUPAC).

``tables_from_pymatgen()`` regenerates the electronegativity and radius tables from an installed
pymatgen; the test suite checks that the shipped numbers equal it.
"""

from __future__ import annotations

import numpy as np
from ase.data import chemical_symbols as _ase_symbols

from autoperi_jax import elements as _shared

N_ELEMENTS = 119

KCAL_PER_MOL_TO_EV = 0.0433641043  # 1 kcal/mol in eV (4.184 kJ/mol / 96.485332 kJ/mol/eV)

CHEMICAL_SYMBOLS: tuple[str, ...] = tuple(_ase_symbols[:N_ELEMENTS])

# (x_i [A], D_i [kcal/mol]) for Z = 1..103, Rappe et al. 1992, Table 1.
_UFF_XD: tuple[tuple[float, float], ...] = (
    (2.886, 0.044), (2.362, 0.056), (2.451, 0.025), (2.745, 0.085), (4.083, 0.180),
    (3.851, 0.105), (3.660, 0.069), (3.500, 0.060), (3.364, 0.050), (3.243, 0.042),
    (2.983, 0.030), (3.021, 0.111), (4.499, 0.505), (4.295, 0.402), (4.147, 0.305),
    (4.035, 0.274), (3.947, 0.227), (3.868, 0.185), (3.812, 0.035), (3.399, 0.238),
    (3.295, 0.019), (3.175, 0.017), (3.144, 0.016), (3.023, 0.015), (2.961, 0.013),
    (2.912, 0.013), (2.872, 0.014), (2.834, 0.015), (3.495, 0.005), (2.763, 0.124),
    (4.383, 0.415), (4.280, 0.379), (4.230, 0.309), (4.205, 0.291), (4.189, 0.251),
    (4.141, 0.220), (4.114, 0.040), (3.641, 0.235), (3.345, 0.072), (3.124, 0.069),
    (3.165, 0.059), (3.052, 0.056), (2.998, 0.048), (2.963, 0.056), (2.929, 0.053),
    (2.899, 0.048), (3.148, 0.036), (2.848, 0.228), (4.463, 0.599), (4.392, 0.567),
    (4.420, 0.449), (4.470, 0.398), (4.500, 0.339), (4.404, 0.332), (4.517, 0.045),
    (3.703, 0.364), (3.522, 0.017), (3.556, 0.013), (3.606, 0.010), (3.575, 0.010),
    (3.547, 0.009), (3.520, 0.008), (3.493, 0.008), (3.368, 0.009), (3.451, 0.007),
    (3.428, 0.007), (3.409, 0.007), (3.391, 0.007), (3.374, 0.006), (3.355, 0.228),
    (3.640, 0.041), (3.141, 0.072), (3.170, 0.081), (3.069, 0.067), (2.954, 0.066),
    (3.120, 0.037), (2.840, 0.073), (2.754, 0.080), (3.293, 0.039), (2.705, 0.385),
    (4.347, 0.680), (4.297, 0.663), (4.370, 0.518), (4.709, 0.325), (4.750, 0.284),
    (4.765, 0.248), (4.900, 0.050), (3.677, 0.404), (3.478, 0.033), (3.396, 0.026),
    (3.424, 0.022), (3.395, 0.022), (3.424, 0.019), (3.424, 0.016), (3.381, 0.014),
    (3.326, 0.013), (3.339, 0.013), (3.313, 0.013), (3.299, 0.012), (3.286, 0.012),
    (3.274, 0.011), (3.248, 0.011), (3.236, 0.011),
)  # fmt: skip

_N = None  # missing value marker in the literal tables below
# Average Shannon crystal radius of the cations of Z = 1..103 [A].
_CATION_R: tuple[float | None, ...] = (
    _N, _N, 0.9, 0.59, 0.41, 0.3, 0.285, _N, 0.22, _N, 1.16, 0.86, 0.675, 0.54, 0.55, 0.47,
    0.335, _N, 1.52, 1.14, 0.885, 0.8517, 0.7775, 0.94, 0.8775, 0.8525, 0.7683, 0.74, 0.82,
    0.88, 0.76, 0.77, 0.66, 0.6, 0.57, _N, 1.66, 1.32, 1.04, 0.86, 0.82, 0.775, 0.7417, 0.661,
    0.745, 0.8462, 1.0867, 1.09, 0.94, 0.83, 0.83, 0.905, 0.88, 0.62, 1.81, 1.49, 1.172, 1.08,
    1.06, 1.2765, 1.11, 1.229, 1.1985, 1.075, 0.9815, 1.131, 1.041, 1.03, 1.095, 1.084, 1.001,
    0.85, 0.82, 0.7667, 0.7125, 0.673, 0.765, 0.805, 1.07, 1.245, 1.3325, 1.1225, 1.035, 0.945,
    0.76, _N, 1.94, 1.62, 1.26, 1.08, 1.04, 0.9913, 1.0, 0.9675, 1.1683, 1.05, 1.035, 1.0255,
    _N, _N, _N, _N, _N,
)  # fmt: skip
# Average Shannon crystal radius of the anions [A] (only these elements have one).
_ANION_R: dict[int, float] = {
    7: 1.32, 8: 1.26, 9: 1.19, 16: 1.7, 17: 1.67, 34: 1.84, 35: 1.82, 52: 2.07, 53: 2.06,
}  # fmt: skip


def _padded(values, n: int = N_ELEMENTS) -> np.ndarray:
    out = np.full(n, np.nan)
    for z, v in enumerate(values, start=1):
        if v is not None:
            out[z] = v
    return out


UFF_X: np.ndarray = _padded([x for x, _ in _UFF_XD])  # [119] A
UFF_D: np.ndarray = _padded([d * KCAL_PER_MOL_TO_EV for _, d in _UFF_XD])  # [119] eV
HAS_UFF: np.ndarray = ~np.isnan(UFF_X)  # [119]
# Electronegativity, covalent radius and mass come from the one shared table
# (autoperi_jax.elements); here missing electronegativities are nan, not 0.
PAULING_CHI: np.ndarray = np.where(
    _shared.HAS_ELECTRONEGATIVITY, np.asarray(_shared.PAULING_ELECTRONEGATIVITY), np.nan
)  # [119]
PAULING_CHI[104:] = np.nan  # beyond the tabulated range of the tables below
HAS_CHI: np.ndarray = ~np.isnan(PAULING_CHI)
CATION_RADIUS: np.ndarray = _padded(_CATION_R)  # [119] A
ANION_RADIUS: np.ndarray = np.full(N_ELEMENTS, np.nan)  # [119] A
for _z, _r in _ANION_R.items():
    ANION_RADIUS[_z] = _r
COVALENT_RADIUS: np.ndarray = np.asarray(_shared.COVALENT_RADIUS, dtype=np.float64)  # [119] A
ATOMIC_MASS: np.ndarray = np.array(_shared.ATOMIC_MASS, dtype=np.float64)  # [119] amu
ATOMIC_MASS[0] = 1.0  # padding "element": any positive mass keeps 1/sqrt(m) finite


def tables_from_pymatgen(z_max: int = 103) -> dict[str, np.ndarray]:
    """Rebuild the electronegativity and ionic-radius tables from pymatgen (host, slow import).

    Args:
        z_max: Largest atomic number to tabulate.

    Returns:
        Dict with ``pauling_chi``, ``cation_radius``, ``anion_radius`` arrays of length
        ``N_ELEMENTS`` (nan where missing), rounded like the shipped tables.
    """
    import math
    import warnings

    from pymatgen.core import Element

    chi, cat, an = [], [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for z in range(1, z_max + 1):
            el = Element.from_Z(z)
            x = el.X
            chi.append(None if x is None or math.isnan(x) else float(x))
            c = float(el.average_cationic_radius)
            a = float(el.average_anionic_radius)
            cat.append(round(c, 4) if c > 0 else None)
            an.append(round(a, 4) if a > 0 else None)
    return {
        "pauling_chi": _padded(chi),
        "cation_radius": _padded(cat),
        "anion_radius": _padded(an),
    }
