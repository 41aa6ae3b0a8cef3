"""The solar-cell case study's DFT-gap lookup finds a crystal's own Perov-5 entry and nothing
for a composition that is not in the index."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from autoperi_jax.crystal import Crystal
from eval.case_study_solar import WINDOW, lookup_gaps, summarize
from eval.metrics import reduced_formula


def test_lookup_and_summary(perov_test):
    crystals = [perov_test.crystal(i) for i in range(12)]
    gaps = {c.name: 1.1 + 0.05 * i for i, c in enumerate(crystals)}  # known, invented gaps
    index = defaultdict(list)
    for c in crystals:
        index[reduced_formula(c)].append((c, gaps[c.name], c.name))
    rot = crystals[0]
    # The same crystal in another setting (cell permuted, origin shifted) still matches.
    moved = Crystal(rot.cell[[1, 2, 0]], (rot.frac_coords[:, [1, 2, 0]] + 0.3) % 1.0,
                    rot.numbers, name="moved")  # fmt: skip
    swapped = Crystal(rot.cell, rot.frac_coords, np.where(rot.numbers == 8, 9, rot.numbers))
    got = lookup_gaps([*crystals, moved, swapped], index)
    assert [g[1] for g in got[:12]] == [c.name for c in crystals]
    assert got[12] == (gaps[rot.name], rot.name)
    assert got[13] is None  # oxygen -> fluorine: a formula the index does not hold
    s = summarize(crystals, got[:12], train_index_ids={crystals[0].name})
    n_in = sum(WINDOW[0] <= g <= WINDOW[1] for g in gaps.values())
    assert s["dft_lookup"]["in_window_count"] == n_in
    assert s["known_share"] == 1.0 and s["novel_vs_perov5"] == 0.0
    assert s["novel_vs_train"] == 1 - 1 / 12
    # against a target: the invented gaps are 1.10 + 0.05 i, i = 0..11
    s = summarize(crystals, got[:12], train_index_ids=set(), target=1.42)
    g = 1.1 + 0.05 * np.arange(12)
    assert s["dft_lookup"]["mae_to_target"] == pytest.approx(np.abs(g - 1.42).mean())
    assert s["dft_lookup"]["within_tolerance_share"] == np.mean(np.abs(g - 1.42) <= 0.2) == 8 / 12
