"""Jitted compositional validity: charge neutrality with the electronegativity ordering.

The rule is CDVAE's ``eval_utils.smact_validity`` on SMACT 2.2.1's element data
(`autoperi_jax.physics.smact_tables`; the evaluation's host version is
`eval.metrics.smact_validity`), written so that it runs inside the jitted sampler on padded
batches (static shapes, no host callbacks):

1. no real atom, or an element outside SMACT's table (Z > 103): invalid;
2. a single element: valid; only metals (``smact.metals``): valid (an alloy);
3. otherwise valid iff some choice of one oxidation state per element (SMACT's default
   lists) is charge neutral, ``sum_e ox_e * count_e = 0``, and passes Pauling's test:
   every cation (ox > 0) is strictly less electronegative than every anion (ox < 0).

Pauling's test as a threshold: an assignment passes iff some ``t`` has every cation at
``chi <= t`` and every anion at ``chi > t`` (take ``t`` = the largest cation ``chi``, or
``-inf`` without cations). So the check loops over the ``A + 1`` thresholds (``-inf`` and
each element's ``chi``) and, for each, runs a subset-sum over charges: element ``e`` may
take its positive states if ``chi_e <= t`` and its negative states if ``chi_e > t``, and
a boolean vector over total charges ``[-Q, Q]`` (``Q = 8 A``, SMACT's largest
``|ox| = 8``) collects the reachable sums. Valid iff 0 is reachable for some ``t``.
Counts need no gcd reduction: neutrality is scale-invariant. Cost per crystal:
``(A + 1) * A * S * (2Q + 1)`` boolean operations (S = 10 states).

One documented difference: SMACT has no electronegativity for He, Ne, Ar, Pm, Rn and Lr,
and CDVAE's rule then depends on the order in which SMACT walks the pairs (a ``TypeError``
caught as "valid"). This check calls any non-alloy composition containing one of them
invalid (stricter; the sampler only draws another candidate).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from autoperi_jax.physics import smact_tables

__all__ = ["composition_valid"]

Array = jax.Array

_MAX_Z = 119


def _tables() -> dict[str, np.ndarray]:
    """SMACT 2.2.1 data as dense arrays indexed by Z (0 and unknown Z: not in the table)."""
    n_states = max(len(v[1]) for v in smact_tables.ELEMENTS.values())
    ox = np.zeros((_MAX_Z, n_states), np.int32)  # [Z, S], 0 = no state
    known = np.zeros(_MAX_Z, bool)
    metal = np.zeros(_MAX_Z, bool)
    chi = np.full(_MAX_Z, np.nan, np.float32)
    for symbol, (z, states, eneg) in smact_tables.ELEMENTS.items():
        known[z] = True
        metal[z] = symbol in smact_tables.METALS
        ox[z, : len(states)] = states
        if eneg is not None:
            chi[z] = eneg
    return {"ox": ox, "known": known, "metal": metal, "chi": chi}


_TABLES = _tables()
_MAX_OX = int(np.abs(_TABLES["ox"]).max())  # 8


def composition_valid(numbers: Array, atom_mask: Array) -> Array:
    """SMACT / CDVAE compositional validity of one padded structure (module docstring).

    Args:
      numbers: [A] atomic numbers (any value on padded slots).
      atom_mask: [A] bool, real atoms.

    Returns:
      [] bool. ``vmap`` it over a batch.
    """
    t = {k: jnp.asarray(v) for k, v in _TABLES.items()}
    numbers = jnp.asarray(numbers, jnp.int32)
    mask = jnp.asarray(atom_mask, bool)
    n_slots = numbers.shape[0]
    z = jnp.where(mask, jnp.clip(numbers, 0, _MAX_Z - 1), 0)  # [A]
    same = mask[:, None] & mask[None, :] & (numbers[:, None] == numbers[None, :])  # [A, A]
    earlier = jnp.tril(jnp.ones((n_slots, n_slots), bool), -1)  # [a, b]: b < a
    first = mask & ~jnp.any(same & earlier, axis=1)  # [A] one slot per element
    count = jnp.sum(same, axis=1)  # [A] atoms of the slot's element
    in_range = (numbers >= 0) & (numbers < _MAX_Z)
    known = jnp.all(~mask | (in_range & t["known"][z]))
    n_elements = jnp.sum(first)
    alloy = jnp.all(~first | t["metal"][z])
    chi = t["chi"][z]  # [A]
    chi_ok = jnp.all(~first | ~jnp.isnan(chi))

    ox = t["ox"][z]  # [A, S]
    charge = ox * count[:, None]  # [A, S] charge the element adds in that state
    q = _MAX_OX * n_slots
    sums = jnp.arange(-q, q + 1)  # [2Q+1]
    thresholds = jnp.concatenate([jnp.array([-jnp.inf]), jnp.where(first, chi, -jnp.inf)])

    def reachable_zero(thr):
        allowed = jnp.where(chi[:, None] <= thr, ox > 0, ox < 0) & first[:, None]  # [A, S]

        def add_element(reach, xs):
            d, ok, is_first = xs  # [S], [S], []
            src = sums[None, :] - d[:, None]  # [S, 2Q+1] sum before this element
            inside = (src >= -q) & (src <= q)
            prev = reach[jnp.clip(src + q, 0, 2 * q)] & inside & ok[:, None]
            return jnp.where(is_first, jnp.any(prev, axis=0), reach), None

        start = sums == 0
        reach, _ = jax.lax.scan(add_element, start, (charge, allowed, first))
        return reach[q]

    neutral = jnp.any(jax.vmap(reachable_zero)(thresholds))
    return known & (n_elements >= 1) & ((n_elements == 1) | alloy | (chi_ok & neutral))
