"""The sampler's jitted compositional-validity rule (`autoperi_jax.physics.composition_valid`)
against the evaluation's host implementation of CDVAE's ``smact_validity``
(`eval.metrics.smact_validity`, itself tested against SMACT 2.2.1's data) and hand-checked
cases."""

import jax
import numpy as np
import pytest

from autoperi_jax.physics import composition_valid, smact_tables
from eval.metrics import smact_validity

A = 6
Z = {s: v[0] for s, v in smact_tables.ELEMENTS.items()}
NO_ENEG = {z for s, (z, _, e) in smact_tables.ELEMENTS.items() if e is None}
check = jax.jit(jax.vmap(composition_valid))


def _pad(rows):
    nums = np.array([np.pad(np.asarray(r, int), (0, A - len(r))) for r in rows])
    return nums, nums > 0


def _formula(*parts):
    return [Z[s] for s, n in parts for _ in range(n)]


@pytest.mark.parametrize(
    "parts, valid",
    [
        ((("Sr", 1), ("Ti", 1), ("O", 3)), True),  # Sr2+ Ti4+ O2-
        ((("Cs", 1), ("Pb", 1), ("I", 3)), True),
        ((("Na", 1), ("Cl", 1)), True),
        ((("Na", 1), ("Cl", 2)), False),  # Na is +-1: Na + 2 Cl is odd for any Cl state
        ((("Li", 2), ("F", 1)), False),  # Li is +1 only, F -1 only
        ((("F", 1), ("Cl", 1)), True),  # Cl+ F-: the more electronegative one is the anion
        ((("Ba", 1), ("F", 1)), False),  # Ba has no +1 state (SMACT 2.2.1: [2])
        ((("O", 2),), True),  # one element
        ((("Cu", 1), ("Zn", 1)), True),  # alloy
        ((("Ne", 1), ("O", 1)), False),  # Ne has no oxidation state
    ],
)
def test_hand_checked_cases(parts, valid):
    nums, mask = _pad([_formula(*parts)])
    assert bool(check(nums, mask)[0]) is valid
    assert smact_validity(nums[0][mask[0]]) is valid


def test_agrees_with_cdvae_rule_on_random_compositions():
    """1-4 elements out of Z 1..103, 1-6 atoms, shuffled over the padded slots. The one
    documented difference: a non-alloy composition with an element that has no Pauling
    electronegativity is always invalid here (CDVAE's outcome depends on SMACT's pair
    order there)."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(1500):
        k = int(rng.integers(1, 5))
        elements = rng.choice(np.arange(1, 104), size=k, replace=False)
        counts = np.ones(k, int)
        for _ in range(int(rng.integers(k, A + 1)) - k):
            counts[rng.integers(k)] += 1
        row = np.repeat(elements, counts)
        rng.shuffle(row)
        rows.append(row)
    nums, mask = _pad(rows)
    slot = rng.permutation(A)  # padding need not be at the end
    nums, mask = nums[:, slot], mask[:, slot]
    got = np.asarray(check(nums, mask))
    want = np.array([smact_validity(r[m]) for r, m in zip(nums, mask)])
    no_eneg = np.array([bool(set(r[m].tolist()) & NO_ENEG) for r, m in zip(nums, mask)])
    assert 0.3 < want.mean() < 0.95  # both outcomes well represented
    np.testing.assert_array_equal(got[~no_eneg], want[~no_eneg])
    assert not np.any(got[no_eneg] & ~want[no_eneg])  # stricter, never looser
    alloy = np.array(
        [all(smact_tables.SYMBOL_BY_Z[z] in smact_tables.METALS for z in r[m]) for r, m in
         zip(nums, mask)]
    )  # fmt: skip
    single = np.array([len(set(r[m].tolist())) == 1 for r, m in zip(nums, mask)])
    assert not np.any(got[no_eneg & ~alloy & ~single])


def test_empty_and_unknown_elements_are_invalid():
    nums, mask = _pad([[], [Z["Sr"], 104, Z["O"]], [Z["O"]]])
    np.testing.assert_array_equal(np.asarray(check(nums, mask)), [False, False, True])
