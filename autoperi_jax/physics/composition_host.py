"""Host compositional validity: CDVAE's ``smact_validity`` on SMACT 2.2.1's element data.

The evaluation's rule (`eval.metrics` re-exports it) and the reference the sampler's
jitted twin `autoperi_jax.physics.composition.composition_valid` is tested against; both
read the tables of `autoperi_jax.physics.smact_tables`. Plain Python on one composition
at a time (no jax).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from autoperi_jax.physics import smact_tables

__all__ = ["reduced_composition", "smact_validity"]


def reduced_composition(numbers: Iterable[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Elements sorted by Z and their counts divided by their gcd (CDVAE get_composition)."""
    counter = Counter(int(z) for z in numbers)
    elems = tuple(sorted(counter))
    counts = np.array([counter[z] for z in elems], dtype=np.int64)
    counts = counts // np.gcd.reduce(counts)
    return elems, tuple(int(c) for c in counts)


def _pauling_ok(ox_states: Sequence[int], enegs: Sequence[float | None]) -> bool:
    """SMACT 2.2.1 ``pauling_test`` with CDVAE's ``except TypeError: True``.

    SMACT's ``eneg_states_test`` walks the pairs of sites in order: a cation at least as
    electronegative as an anion fails; a pair with a missing electronegativity fails only
    when neither of the two sign tests applied. When a sign test has to compare with a
    missing value Python raises ``TypeError``, which CDVAE's ``smact_validity`` catches and
    treats as "electronegativity OK" for the whole combination. All of this is reproduced.
    """
    for (ox1, e1), (ox2, e2) in itertools.combinations(zip(ox_states, enegs), 2):
        if ox1 > 0 and ox2 < 0:
            if e1 is None or e2 is None:
                return True  # TypeError in SMACT, caught by CDVAE
            if e1 >= e2:
                return False
        elif ox1 < 0 and ox2 > 0:
            if e1 is None or e2 is None:
                return True
            if e1 <= e2:
                return False
        elif e1 is None or e2 is None:
            return False
    return True


def smact_validity(
    numbers: Iterable[int], use_pauling_test: bool = True, include_alloys: bool = True
) -> bool:
    """Compositional validity: CDVAE ``eval_utils.smact_validity`` on SMACT 2.2.1 data.

    Rule (CDVAE, scripts/eval_utils.py, computed with ``smact==2.2.1`` per its env.yml):

    1. Reduce the composition: elements sorted by Z, counts divided by their gcd.
    2. A single-element composition is valid.
    3. If every element is in ``smact.metals`` (an alloy), it is valid.
    4. Otherwise it is valid iff some assignment of one oxidation state per element (each
       from SMACT's default list) is charge neutral, ``sum(ox_i * count_i) == 0``, and
       passes the Pauling electronegativity test (cations less electronegative than
       anions; see `_pauling_ok` for the missing-value corner cases).

    The oxidation states, electronegativities and metal list are SMACT 2.2.1's
    (`autoperi_jax.physics.smact_tables`, shared with the sampler's jitted twin
    `autoperi_jax.physics.composition_valid`); SMACT >= 3 changed them (e.g. Ca is +2 only
    there) and ``neutral_ratios``' return value, which changes the numbers.

    Args:
      numbers: atomic numbers of all sites (any order, repeats allowed).
      use_pauling_test: apply step 4's electronegativity test (CDVAE: True).
      include_alloys: apply step 3 (CDVAE: True).

    Returns:
      True if the composition is valid. Elements beyond SMACT 2.2.1's table (Z > 103)
      make it invalid (CDVAE would raise).
    """
    elems, counts = reduced_composition(numbers)
    if not elems:
        return False
    symbols = [smact_tables.SYMBOL_BY_Z.get(z) for z in elems]
    if any(s is None for s in symbols):
        return False
    if len(symbols) == 1:
        return True
    if include_alloys and all(s in smact_tables.METALS for s in symbols):
        return True
    if math.gcd(*counts) != 1:  # SMACT's neutral_ratios keeps gcd-1 ratios only
        return False
    enegs = [smact_tables.PAULING_ENEG[s] for s in symbols]
    ox_lists = [smact_tables.OXIDATION_STATES[s] for s in symbols]
    for ox_states in itertools.product(*ox_lists):
        if sum(o * c for o, c in zip(ox_states, counts)) != 0:
            continue
        if not use_pauling_test or _pauling_ok(ox_states, enegs):
            return True
    return False
