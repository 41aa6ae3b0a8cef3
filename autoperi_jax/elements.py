"""Tabulated per-element data, indexed by atomic number Z (index 0 is a padding entry).

Sources (copied into this file so that loading needs neither network nor a slow import):

* ``PAULING_ELECTRONEGATIVITY``: Pauling electronegativity chi_P as tabulated by pymatgen
  2026.10.24 (``Element.X``; data from WebElements / CRC Handbook). Elements without a
  Pauling value (He, Ne, Ar and Z >= 104) are stored as 0.0; use
  ``HAS_ELECTRONEGATIVITY`` to tell them apart.
* ``COVALENT_RADIUS``: covalent radii in Angstrom from B. Cordero et al., "Covalent radii
  revisited", Dalton Trans. 2008, 2832-2838, as shipped in ``ase.data.covalent_radii``
  (ASE 3.29.0; 0.2 A placeholder for elements the paper does not cover).
* ``ATOMIC_MASS``: standard atomic weights in amu from ``ase.data.atomic_masses`` (IUPAC 2016).
"""

from typing import Any, Final

import numpy as np

MAX_Z: Final[int] = 118

PAULING_ELECTRONEGATIVITY: Final[tuple[float, ...]] = (
    0.00,
    2.20,
    0.00,
    0.98,
    1.57,
    2.04,
    2.55,
    3.04,
    3.44,
    3.98,
    0.00,
    0.93,
    1.31,
    1.61,
    1.90,
    2.19,
    2.58,
    3.16,
    0.00,
    0.82,
    1.00,
    1.36,
    1.54,
    1.63,
    1.66,
    1.55,
    1.83,
    1.88,
    1.91,
    1.90,
    1.65,
    1.81,
    2.01,
    2.18,
    2.55,
    2.96,
    3.00,
    0.82,
    0.95,
    1.22,
    1.33,
    1.60,
    2.16,
    1.90,
    2.20,
    2.28,
    2.20,
    1.93,
    1.69,
    1.78,
    1.96,
    2.05,
    2.10,
    2.66,
    2.60,
    0.79,
    0.89,
    1.10,
    1.12,
    1.13,
    1.14,
    1.13,
    1.17,
    1.20,
    1.20,
    1.10,
    1.22,
    1.23,
    1.24,
    1.25,
    1.10,
    1.27,
    1.30,
    1.50,
    2.36,
    1.90,
    2.20,
    2.20,
    2.28,
    2.54,
    2.00,
    1.62,
    2.33,
    2.02,
    2.00,
    2.20,
    2.20,
    0.70,
    0.90,
    1.10,
    1.30,
    1.50,
    1.38,
    1.36,
    1.28,
    1.30,
    1.30,
    1.30,
    1.30,
    1.30,
    1.30,
    1.30,
    1.30,
    1.30,
    0.00,
    0.00,
    0.00,
    0.00,
    0.00,
    0.00,
    0.00,
    0.00,
    0.00,
    0.00,
    0.00,
    0.00,
    0.00,
    0.00,
    0.00,
)

COVALENT_RADIUS: Final[tuple[float, ...]] = (
    0.20,
    0.31,
    0.28,
    1.28,
    0.96,
    0.84,
    0.76,
    0.71,
    0.66,
    0.57,
    0.58,
    1.66,
    1.41,
    1.21,
    1.11,
    1.07,
    1.05,
    1.02,
    1.06,
    2.03,
    1.76,
    1.70,
    1.60,
    1.53,
    1.39,
    1.39,
    1.32,
    1.26,
    1.24,
    1.32,
    1.22,
    1.22,
    1.20,
    1.19,
    1.20,
    1.20,
    1.16,
    2.20,
    1.95,
    1.90,
    1.75,
    1.64,
    1.54,
    1.47,
    1.46,
    1.42,
    1.39,
    1.45,
    1.44,
    1.42,
    1.39,
    1.39,
    1.38,
    1.39,
    1.40,
    2.44,
    2.15,
    2.07,
    2.04,
    2.03,
    2.01,
    1.99,
    1.98,
    1.98,
    1.96,
    1.94,
    1.92,
    1.92,
    1.89,
    1.90,
    1.87,
    1.87,
    1.75,
    1.70,
    1.62,
    1.51,
    1.44,
    1.41,
    1.36,
    1.36,
    1.32,
    1.45,
    1.46,
    1.48,
    1.40,
    1.50,
    1.50,
    2.60,
    2.21,
    2.15,
    2.06,
    2.00,
    1.96,
    1.90,
    1.87,
    1.80,
    1.69,
    2.00,
    2.00,
    2.00,
    2.00,
    2.00,
    2.00,
    2.00,
    2.00,
    2.00,
    2.00,
    2.00,
    2.00,
    2.00,
    2.00,
    2.00,
    2.00,
    2.00,
    2.00,
    2.00,
    2.00,
    2.00,
    2.00,
)

ATOMIC_MASS: Final[tuple[float, ...]] = (
    1.0000,
    1.0080,
    4.0026,
    6.9400,
    9.0122,
    10.8100,
    12.0110,
    14.0070,
    15.9990,
    18.9984,
    20.1797,
    22.9898,
    24.3050,
    26.9815,
    28.0850,
    30.9738,
    32.0600,
    35.4500,
    39.9480,
    39.0983,
    40.0780,
    44.9559,
    47.8670,
    50.9415,
    51.9961,
    54.9380,
    55.8450,
    58.9332,
    58.6934,
    63.5460,
    65.3800,
    69.7230,
    72.6300,
    74.9216,
    78.9710,
    79.9040,
    83.7980,
    85.4678,
    87.6200,
    88.9058,
    91.2240,
    92.9064,
    95.9500,
    97.9072,
    101.0700,
    102.9055,
    106.4200,
    107.8682,
    112.4140,
    114.8180,
    118.7100,
    121.7600,
    127.6000,
    126.9045,
    131.2930,
    132.9055,
    137.3270,
    138.9055,
    140.1160,
    140.9077,
    144.2420,
    144.9128,
    150.3600,
    151.9640,
    157.2500,
    158.9254,
    162.5000,
    164.9303,
    167.2590,
    168.9342,
    173.0540,
    174.9668,
    178.4900,
    180.9479,
    183.8400,
    186.2070,
    190.2300,
    192.2170,
    195.0840,
    196.9666,
    200.5920,
    204.3800,
    207.2000,
    208.9804,
    208.9824,
    209.9872,
    222.0176,
    223.0197,
    226.0254,
    227.0277,
    232.0377,
    231.0359,
    238.0289,
    237.0482,
    244.0642,
    243.0614,
    247.0703,
    247.0703,
    251.0796,
    252.0830,
    257.0951,
    258.0984,
    259.1010,
    262.1100,
    267.1220,
    268.1260,
    271.1340,
    270.1330,
    269.1338,
    278.1560,
    281.1650,
    281.1660,
    285.1770,
    286.1820,
    289.1900,
    289.1940,
    293.2040,
    293.2080,
    294.2140,
)

HAS_ELECTRONEGATIVITY: Final[np.ndarray] = np.asarray(PAULING_ELECTRONEGATIVITY) > 0.0  # [119]


def atom_features(numbers: np.ndarray) -> np.ndarray:
    """Tabulated scalar features of atoms.

    Args:
      numbers: atomic numbers, [n_atoms] int.

    Returns:
      [n_atoms, 3] float32: Pauling electronegativity, covalent radius (A), and a 0/1 flag
      that the electronegativity is tabulated.
    """
    z = np.asarray(numbers, dtype=np.int64)
    return np.stack(
        [
            np.asarray(PAULING_ELECTRONEGATIVITY)[z],
            np.asarray(COVALENT_RADIUS)[z],
            HAS_ELECTRONEGATIVITY[z].astype(np.float64),
        ],
        axis=-1,
    ).astype(np.float32)


def composition_numbers(composition: Any) -> np.ndarray:
    """The atoms of one cell as sorted atomic numbers.

    Args:
      composition: a formula string (``"SrTiO3"``, ``"Ba2TiO4"``: the atoms of one cell,
        not a reduced formula), a pymatgen ``Composition`` (or any mapping element ->
        count) with integer counts, or a sequence of atomic numbers.

    Returns:
      [n_atoms] int64 atomic numbers in ascending order.

    Raises:
      ValueError: an empty composition, an unknown element, a count that is not a
        positive integer; each message names the composition.
    """
    from ase.data import atomic_numbers  # light (no ase.io)
    from ase.formula import Formula

    label = repr(composition if isinstance(composition, str) else str(composition))
    if isinstance(composition, str):
        text = composition.replace(" ", "")
        if not text:
            raise ValueError("empty composition: give a formula such as 'SrTiO3'")
        try:
            counts: dict[Any, Any] = dict(Formula(text).count())
        except ValueError as e:
            raise ValueError(
                f"composition {label}: not a formula (element symbols with integer counts, "
                "e.g. 'SrTiO3')"
            ) from e
    elif hasattr(composition, "items"):
        counts = {str(k): v for k, v in composition.items()}
    else:
        numbers = np.asarray(composition)
        if numbers.size == 0:
            raise ValueError("empty composition: no atoms given")
        if numbers.ndim != 1 or not np.issubdtype(numbers.dtype, np.integer):
            raise ValueError(f"composition {label}: expected a list of atomic numbers")
        bad = numbers[(numbers < 1) | (numbers > MAX_Z)]
        if len(bad):
            raise ValueError(f"composition {label}: atomic number {int(bad[0])} is not 1..{MAX_Z}")
        return np.sort(numbers.astype(np.int64))
    numbers_list: list[int] = []
    for symbol, count in counts.items():
        z = atomic_numbers.get(str(symbol))
        if z is None or z < 1 or z > MAX_Z:
            raise ValueError(f"composition {label}: unknown element {symbol!r}")
        if float(count) != int(float(count)) or int(float(count)) < 1:
            raise ValueError(
                f"composition {label}: {symbol} has count {count}; the atoms of one cell "
                "need positive integer counts"
            )
        numbers_list += [z] * int(float(count))
    if not numbers_list:
        raise ValueError(f"empty composition {label}: no atoms")
    return np.sort(np.asarray(numbers_list, np.int64))


def composition_row(composition: Any, max_atoms: int) -> np.ndarray:
    """[max_atoms] int32: the sorted atomic numbers of one cell (`composition_numbers`),
    0-padded to a model's atom budget: the flow context of crystal structure prediction.

    Raises:
      ValueError: a bad composition, or more than ``max_atoms`` atoms (never truncated).
    """
    numbers = composition_numbers(composition)
    if len(numbers) > max_atoms:
        raise ValueError(
            f"composition {composition!r} has {len(numbers)} atoms; this model's cells "
            f"hold at most {max_atoms} (give the atoms of one cell, e.g. a reduced formula)"
        )
    row = np.zeros(max_atoms, np.int32)
    row[: len(numbers)] = numbers
    return row


def formula_label(numbers: Any) -> str:
    """The formula of a cell's atomic numbers (0 = empty slot), metals first:
    ``[8, 8, 8, 22, 38] -> 'SrTiO3'`` (the names of `Generator.predict_structures`)."""
    from ase.data import chemical_symbols
    from ase.formula import Formula

    symbols = [chemical_symbols[int(z)] for z in np.asarray(numbers).ravel() if z]
    return Formula.from_list(symbols).format("metal")
