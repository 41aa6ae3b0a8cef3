"""Distinct structures: the greedy StructureMatcher rule behind uniqueness, as a filter.

A crystal is a duplicate of an earlier one when pymatgen's ``StructureMatcher`` (with the
given tolerances; pymatgen's defaults, the field's choice for uniqueness and novelty)
fits the two; structures of different reduced formula never match, so crystals are
compared only within their formula. `DistinctFilter.add` keeps a crystal iff it matches
no crystal kept before it: over a sequence this keeps exactly the first occurrence of
each structure, the rule `eval.metrics.uniqueness` counts with (which uses this class).

Used by ``Generator.sample(..., unique=True)`` / ``autoperi sample --unique`` to return n
mutually distinct crystals (host side, after the jitted sampler).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np

from autoperi_jax.crystal import Crystal
from autoperi_jax.protocol import NOVELTY_MATCHER

__all__ = ["DEFAULT_TOLERANCES", "DistinctFilter", "matcher", "reduced_formula", "safe_fit"]

#: pymatgen's default ``StructureMatcher`` tolerances: the protocol's `NOVELTY_MATCHER`.
DEFAULT_TOLERANCES: dict[str, float] = NOVELTY_MATCHER


def reduced_formula(c: Crystal) -> str:
    """pymatgen's reduced formula of a crystal's composition (groups uniqueness / novelty)."""
    # lazy, as the matcher below: pymatgen (0.6 s) loads only when structures are compared
    from pymatgen.core import Composition
    from pymatgen.core.periodic_table import Element

    zs, counts = np.unique(c.numbers, return_counts=True)
    return Composition({Element.from_Z(int(z)): int(n) for z, n in zip(zs, counts)}).reduced_formula


def matcher(tolerances: Mapping[str, float] = DEFAULT_TOLERANCES) -> Any:
    """pymatgen ``StructureMatcher`` with ``ltol`` / ``stol`` / ``angle_tol`` from the mapping."""
    from pymatgen.analysis.structure_matcher import StructureMatcher  # lazy: 0.6 s

    return StructureMatcher(
        ltol=tolerances["ltol"], stol=tolerances["stol"], angle_tol=tolerances["angle_tol"]
    )


def safe_fit(m: Any, s1: Any, s2: Any) -> bool:
    """``m.fit(s1, s2)``; a structure pymatgen cannot match (it raises) matches nothing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bool(m.fit(s1, s2))
    except Exception:
        return False


class DistinctFilter:
    """Keeps the first occurrence of each structure among the crystals it is shown.

    Args:
      tolerances: ``StructureMatcher`` tolerances (default pymatgen's).

    Example::

        f = DistinctFilter()
        kept = [c for c in crystals if f.add(c)]  # pairwise distinct, in order
    """

    def __init__(self, tolerances: Mapping[str, float] = DEFAULT_TOLERANCES) -> None:
        self._matcher = matcher(tolerances)
        self._kept: dict[str, list[Any]] = defaultdict(list)  # formula -> structures
        self.n_seen = 0
        self.n_kept = 0

    def add(self, crystal: Crystal, formula: str | None = None) -> bool:
        """True (and remembered) if ``crystal`` matches no crystal kept so far.

        Args:
          crystal: the candidate.
          formula: its reduced formula if already known (`reduced_formula`).
        """
        self.n_seen += 1
        group = self._kept[reduced_formula(crystal) if formula is None else formula]
        s = crystal.to_pymatgen()
        if any(safe_fit(self._matcher, s, k) for k in group):
            return False
        group.append(s)
        self.n_kept += 1
        return True
