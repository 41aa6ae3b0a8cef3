"""Known-answer tests of the evaluation metrics (eval/metrics.py, eval/fingerprints.py)."""

from __future__ import annotations

import importlib.metadata
import itertools

import numpy as np
import pytest

from autoperi_jax.crystal import Crystal, lattice_params_to_cell
from autoperi_jax.physics.composition_host import reduced_composition
from eval import metrics as M
from eval.fingerprints import (
    COMP_SCALER_MEANS,
    COMP_SCALER_STDS,
    FingerprintCache,
    cdvae_comp_scale,
    composition_fingerprints,
    structure_fingerprints,
)

CUBIC5 = np.eye(3) * 5.0


def perovskite(a: float = 4.0, species=(38, 22, 8, 8, 8), name: str = "") -> Crystal:
    """A cubic ABO3 perovskite (default SrTiO3) with lattice constant ``a``."""
    frac = [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
    return Crystal(np.eye(3) * a, frac, list(species), name=name)


def rock_salt(a: float, species=(11, 17)) -> Crystal:
    """Conventional rock-salt cell (8 atoms)."""
    fcc = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    frac = np.concatenate([fcc, fcc + 0.5])
    return Crystal(np.eye(3) * a, frac, [species[0]] * 4 + [species[1]] * 4)


def rotated_shifted(c: Crystal, seed: int) -> Crystal:
    """The same crystal, rotated, translated and with its atoms permuted."""
    from autoperi_jax.crystal import random_rotation

    rng = np.random.default_rng(seed)
    perm = rng.permutation(c.num_atoms)
    out = c.replace(frac_coords=c.frac_coords[perm], numbers=c.numbers[perm])
    return out.translate(rng.uniform(size=3)).rotate(random_rotation(rng))


# ------------------------------------------------------------------------------- SMACT
@pytest.mark.parametrize(
    "numbers, expected, why",
    [
        ([6] * 8, True, "single element (carbon) is always valid"),
        ([14], True, "single atom"),
        ([26, 28, 28], True, "all-metal composition (FeNi2) counts as an alloy"),
        ([29, 29, 29, 79], True, "Cu3Au: all metals"),
        ([11, 17], True, "NaCl: Na+ Cl-"),
        ([11, 17, 17], False, "NaCl2: no neutral assignment"),
        ([20, 17], True, "CaCl: SMACT 2.x lists Ca +1 (SMACT 4: Ca +2 only)"),
        ([20, 8], True, "CaO"),
        ([1, 1, 17], False, "H2Cl: neutral only with Cl+2 / H-1, fails Pauling"),
        ([2, 8], False, "HeO: He has no oxidation states"),
        ([38, 22, 8, 8, 8], True, "SrTiO3"),
        ([61, 17, 17, 17], True, "PmCl3: Pm has no electronegativity -> CDVAE's TypeError=OK"),
        ([119, 8], False, "element beyond SMACT's table"),
    ],
)
def test_smact_validity_rules(numbers, expected, why):
    assert M.smact_validity(numbers) is expected, why


def test_smact_pauling_switch_and_alloy_switch():
    # H2Cl is charge-balanced (H-1, Cl+2): only the electronegativity test rejects it.
    assert M.smact_validity([1, 1, 17], use_pauling_test=False)
    assert not M.smact_validity([1, 1, 17], use_pauling_test=True)
    # Fe2Ni3 has no neutral assignment of positive-only metal states: valid only as an alloy.
    assert M.smact_validity([26, 26, 28, 28, 28], include_alloys=True)
    assert not M.smact_validity([26, 26, 28, 28, 28], include_alloys=False)


def test_smact_composition_is_reduced_and_order_free():
    # Sr2Ti2O6 reduces to SrTiO3; the order of sites does not matter.
    assert M.smact_validity([8, 38, 8, 22, 8, 8, 38, 22, 8, 8])
    assert M.smact_validity([11, 11, 17, 17]) == M.smact_validity([17, 11])


def _cdvae_reference_validity(numbers) -> bool:
    """CDVAE's smact_validity written against the SMACT 2.2.1 API (the reference)."""
    import smact
    from smact.screening import pauling_test

    from autoperi_jax.physics.smact_tables import SYMBOL_BY_Z

    elems, counts = reduced_composition(numbers)
    symbols = tuple(SYMBOL_BY_Z[z] for z in elems)
    space = smact.element_dictionary(symbols)
    smact_elems = [e[1] for e in space.items()]
    enegs = [e.pauling_eneg for e in smact_elems]
    ox_combos = [e.oxidation_states for e in smact_elems]
    if len(set(symbols)) == 1:
        return True
    if all(s in smact.metals for s in symbols):
        return True
    for ox in itertools.product(*ox_combos):
        ok, _ = smact.neutral_ratios(ox, stoichs=[(c,) for c in counts], threshold=max(counts))
        if ok:
            try:
                if pauling_test(ox, enegs):
                    return True
            except TypeError:
                return True
    return False


def _smact_2_2_1():
    smact = pytest.importorskip("smact")
    try:
        version = importlib.metadata.version("smact")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    if version != "2.2.1":
        pytest.skip(f"cross-check needs smact==2.2.1 (CDVAE's version), found {version}")
    return smact


def test_carried_smact_table_equals_smact_2_2_1():
    smact = _smact_2_2_1()
    from autoperi_jax.physics import smact_tables

    for symbol, (z, ox, eneg) in smact_tables.ELEMENTS.items():
        e = smact.Element(symbol)
        assert (int(e.number), tuple(e.oxidation_states), e.pauling_eneg) == (z, ox, eneg)
    assert set(smact.metals) == smact_tables.METALS


def test_smact_validity_equals_cdvae_on_random_compositions():
    _smact_2_2_1()
    rng = np.random.default_rng(0)
    # Include elements without electronegativity (He, Ne, Ar, Pm, Rn, Lr) so the
    # missing-value branches of SMACT's Pauling test are exercised.
    pool = np.array([1, 2, 6, 7, 8, 9, 10, 11, 16, 17, 18, 20, 22, 26, 38, 53, 61, 79, 85, 86, 103])
    cases = [[61, 26, 85, 85], [26, 61, 8, 8], [2, 8, 8]]
    for _ in range(400):
        k = int(rng.integers(2, 4))
        elems = rng.choice(pool, size=k, replace=False)
        counts = rng.integers(1, 4, size=k)
        cases.append([int(e) for e, c in zip(elems, counts) for _ in range(c)])
    mismatches = [c for c in cases if M.smact_validity(c) != _cdvae_reference_validity(c)]
    assert not mismatches


# --------------------------------------------------------------------- structure rules
def test_structure_validity_close_atoms():
    close = Crystal(CUBIC5, [[0.1, 0.1, 0.1], [0.16, 0.1, 0.1]], [8, 8])  # 0.3 A apart
    ok = Crystal(CUBIC5, [[0.1, 0.1, 0.1], [0.22, 0.1, 0.1]], [8, 8])  # 0.6 A apart
    assert not M.structure_validity(close)
    assert M.structure_validity(ok)
    assert M.structure_validity(close, cutoff=0.25)


def test_structure_validity_is_periodic():
    # 0.02 and 0.98 are 0.2 A apart through the cell boundary.
    across = Crystal(CUBIC5, [[0.02, 0.5, 0.5], [0.98, 0.5, 0.5]], [8, 8])
    assert not M.structure_validity(across)


def test_structure_validity_volume_and_single_atom():
    tiny = Crystal(np.eye(3) * 0.4, [[0, 0, 0]], [6])  # 0.064 A^3
    assert not M.structure_validity(tiny)
    # CDVAE pads the diagonal: an atom's own images are not tested (1.0 A cell is valid).
    assert M.structure_validity(Crystal(np.eye(3) * 1.0, [[0, 0, 0]], [6]))


def test_features_agree_with_the_rules():
    crystals = [
        Crystal(CUBIC5, [[0.1, 0.1, 0.1], [0.16, 0.1, 0.1]], [11, 17]),
        perovskite(),
        Crystal(np.eye(3) * 0.4, [[0, 0, 0]], [6]),
        None,
        rock_salt(5.6),
    ]
    f = M.compute_features(crystals, workers=1, progress=False)
    assert f.struct_valid.tolist() == [False, True, False, False, True]
    assert f.comp_valid.tolist() == [True, True, True, False, True]
    assert f.constructed.tolist() == [True, True, False, False, True]
    for i, c in enumerate(crystals):
        if f.constructed[i]:
            assert f.struct_valid[i] == M.structure_validity(c)
            assert f.density[i] == pytest.approx(c.to_pymatgen().density)
    assert f.n_elements.tolist() == [2, 3, 1, 0, 2]
    assert f.spacegroup[1] == 221 and f.spacegroup[4] == 225
    assert f.formula[4] == "NaCl"
    assert M.validity_rates(f)["validity"] == pytest.approx(2 / 5)


def test_features_parallel_equals_serial():
    rng = np.random.default_rng(1)
    crystals = [perovskite(a=float(a)) for a in rng.uniform(3.5, 4.5, size=300)]
    serial = M.compute_features(crystals, workers=1, progress=False)
    par = M.compute_features(crystals, workers=2, progress=False)
    np.testing.assert_array_equal(serial.density, par.density)
    np.testing.assert_array_equal(serial.spacegroup, par.spacegroup)


# ----------------------------------------------------------------------------- matching
def test_reconstruction_perturbed_copies():
    rng = np.random.default_rng(0)
    refs = [perovskite(a=4.0 + 0.05 * i) for i in range(6)]
    slightly = [
        r.replace(frac_coords=r.frac_coords + rng.normal(scale=0.005, size=(5, 3))) for r in refs
    ]
    slightly = [rotated_shifted(c, i) for i, c in enumerate(slightly)]
    strongly = [r.replace(frac_coords=rng.uniform(size=(5, 3))) for r in refs]
    ones = np.ones(6, bool)
    good = M.reconstruction_metrics(slightly, refs, ones, ones, workers=1, progress=False)
    bad = M.reconstruction_metrics(strongly, refs, ones, ones, workers=1, progress=False)
    assert good["match_rate"] == 1.0
    assert 0 < good["rmse"] < 0.05
    assert bad["match_rate"] == 0.0
    assert np.isnan(bad["rmse"])
    # A 50 % longer lattice exceeds ltol=0.3: no match.
    stretched = [r.replace(cell=r.cell * np.array([1.5, 1, 1])[:, None]) for r in refs]
    assert (
        M.reconstruction_metrics(stretched, refs, ones, ones, workers=1, progress=False)[
            "match_rate"
        ]
        == 0.0
    )


def test_reconstruction_counts_only_valid_predictions():
    refs = [perovskite(a=4.0 + 0.05 * i) for i in range(4)]
    preds = [refs[0], refs[1], None, refs[3]]
    pred_valid = np.array([True, False, False, True])
    ref_valid = np.array([True, True, True, False])
    r = M.reconstruction_metrics(preds, refs, pred_valid, ref_valid, workers=1, progress=False)
    assert r["match_rate"] == 0.5  # refs 0 and 3; ref 1's prediction is invalid
    assert r["match_rate_ceiling"] == 0.75
    assert r["rmse"] == pytest.approx(0.0, abs=1e-8)
    strict = M.reconstruction_metrics(
        preds, refs, pred_valid, ref_valid, require_reference_valid=True, workers=1,
        progress=False,
    )  # fmt: skip
    assert strict["match_rate"] == 0.25


def _with_duplicates() -> list[Crystal]:
    """7 crystals, 4 distinct: first occurrences at 0, 2, 3 and 6."""
    a = perovskite(4.0)
    b = perovskite(4.0, species=(56, 22, 8, 8, 8))  # BaTiO3
    c = perovskite(4.0)  # same formula as a, Ti moved 1.2 A off centre: another structure
    c = c.replace(frac_coords=c.frac_coords + np.array([[0, 0, 0], [0, 0, 0.3], *[[0, 0, 0]] * 3]))
    d = rock_salt(5.6)
    return [a, rotated_shifted(a, 1), b, c, rotated_shifted(c, 2), rotated_shifted(c, 3), d]


def test_uniqueness_of_duplicates():
    samples = _with_duplicates()
    formulas = M.compute_features(samples, workers=1, progress=False).formula
    u = M.uniqueness(samples, formulas, workers=1, progress=False)
    assert u["n_unique"] == 4 and u["n"] == 7
    assert u["uniqueness"] == pytest.approx(4 / 7)
    assert u["is_first"].tolist() == [True, False, True, True, False, False, True]
    # Only the masked samples are considered.
    mask = np.array([True, True, False, False, False, False, False])
    assert M.uniqueness(samples, formulas, mask, workers=1, progress=False)["uniqueness"] == 0.5


def test_distinct_filter_keeps_first_occurrences():
    """The filter behind ``sample(unique=True)`` (and `uniqueness`) on the same cases."""
    from autoperi_jax.distinct import DEFAULT_TOLERANCES, DistinctFilter

    assert DEFAULT_TOLERANCES == M.NOVELTY_MATCHER  # the sampler dedups as eval counts
    f = DistinctFilter()
    assert [f.add(c) for c in _with_duplicates()] == [True, False, True, True, False, False, True]
    assert (f.n_seen, f.n_kept) == (7, 4)
    # a 4 % uniaxial strain is within pymatgen's default ltol (0.2): the same structure; a
    # tight matcher tells it apart
    strained = perovskite(4.0).replace(cell=np.diag([4.0, 4.0, 4.16]))
    assert not f.add(strained)
    tight = DistinctFilter({"ltol": 0.01, "stol": 0.3, "angle_tol": 5.0})
    assert tight.add(perovskite(4.0)) and tight.add(strained)


def test_novelty_against_training_set():
    a, b = perovskite(4.0), perovskite(4.0, (56, 22, 8, 8, 8))
    c = perovskite(4.0, (20, 22, 8, 8, 8))  # CaTiO3: a formula absent from training
    train = [a, b]
    samples = [rotated_shifted(a, 5), c, rock_salt(5.6), rotated_shifted(b, 6)]
    f_s = M.compute_features(samples, workers=1, progress=False).formula
    f_t = M.compute_features(train, workers=1, progress=False).formula
    nv = M.novelty(samples, f_s, train, f_t, workers=1, progress=False)
    assert nv["is_novel"].tolist() == [False, True, True, False]
    assert nv["novelty"] == 0.5


# ----------------------------------------------------------------------------- coverage
def test_coverage_known_answer():
    rs = np.zeros((3, 61))
    rs[1, 0], rs[2, 0] = 1.0, 2.0
    rc = np.tile(COMP_SCALER_MEANS, (3, 1))  # scales to zero
    ss = np.zeros((4, 61))
    ss[1, 0] = 0.15  # within 0.2 of ref 0
    ss[2, 0] = 1.5  # 0.5 from refs 1 and 2: not covered / not precise
    ss[3, 0] = 2.0  # its fingerprint failed: dropped, but counted in the COV-P denominator
    sc = np.tile(COMP_SCALER_MEANS, (4, 1))
    ok = np.array([True, True, True, False])
    cov = M.coverage(ss, sc, rs, rc, 0.2, 4.0, sample_ok=ok, num_generated=4)
    assert cov["cov_recall"] == pytest.approx(1 / 3)  # only ref 0 has a sample within 0.2
    assert cov["cov_precision"] == pytest.approx(2 / 4)
    assert cov["amsd_recall"] == pytest.approx(np.mean([0.0, 0.5, 0.5]))
    again, near_s, near_c = M.coverage(ss, sc, rs, rc, 0.2, 4.0, sample_ok=ok, num_generated=4,
                                       return_nearest=True)  # fmt: skip
    assert again == cov
    np.testing.assert_allclose(near_s, [0.0, 0.5, 0.5])  # refs 1, 2: the recall misses
    np.testing.assert_allclose(near_c, 0.0, atol=1e-12)
    # Composition distances are taken separately: moving sample 0's composition 10 standard
    # deviations away in every feature loses its precision hit, but ref 0 keeps its recall
    # (its nearest composition is another sample's).
    sc2 = sc.copy()
    sc2[0] = COMP_SCALER_MEANS + 10 * COMP_SCALER_STDS
    cov2 = M.coverage(ss, sc2, rs, rc, 0.2, 4.0, sample_ok=ok, num_generated=4)
    assert cov2["cov_precision"] == pytest.approx(1 / 4)
    assert cov2["cov_recall"] == pytest.approx(1 / 3)
    # misses by cause: sample 2 is far in structure only, sample 0 (second call) in
    # composition only; with the failed fingerprint everything adds up to 1
    assert cov["cov_precision_miss_struct_only"] == pytest.approx(1 / 4)
    assert cov["cov_precision_miss_comp_only"] == cov["cov_precision_miss_both"] == 0.0
    assert cov2["cov_precision_miss_comp_only"] == pytest.approx(1 / 4)
    parts = ("cov_precision", "cov_precision_miss_struct_only", "cov_precision_miss_comp_only",
             "cov_precision_miss_both")  # fmt: skip
    assert sum(cov2[k] for k in parts) + 1 / 4 == pytest.approx(1.0)


def test_comp_scaler_replaces_nan():
    x = np.tile(COMP_SCALER_MEANS, (2, 1))
    x[0, 5] = np.nan
    assert np.all(cdvae_comp_scale(x) == 0.0)


def test_nearest_distance_blocks():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 4)), rng.normal(size=(30, 4))
    from scipy.spatial.distance import cdist

    d = cdist(a, b)
    am, bm = M.nearest_distance(a, b, block=7)
    np.testing.assert_allclose(am, d.min(1))
    np.testing.assert_allclose(bm, d.min(0))


# ---------------------------------------------------------------------------------- EMD
def test_emd_report_draws_and_all_valid():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=500)
    same = M.emd_report(ref, ref, np.ones(500, bool), n_draw=100, seeds=range(5))
    assert same["all_valid"] == 0.0
    assert len(same["values"]) == 5 and same["mean"] > 0  # draws are noisy
    again = M.emd_report(ref, ref, np.ones(500, bool), n_draw=100, seeds=range(5))
    assert again["values"] == same["values"]  # seeded
    shifted = M.emd_report(ref + 1.0, ref, np.ones(500, bool), n_draw=100, seeds=[0])
    assert shifted["all_valid"] == pytest.approx(1.0)
    few = M.emd_report(ref[:50], ref, np.ones(50, bool), n_draw=100, seeds=range(3))
    assert few["values"] == [] and "fewer valid samples" in few["note"]
    # Invalid samples are excluded before the draw.
    valid = np.zeros(500, bool)
    valid[:10] = True
    assert M.emd_report(ref, ref, valid, n_draw=5, seeds=[0])["n_valid"] == 10


def test_draw_matches_numpy_choice():
    idx = M.draw_indices(1000, 100, seed=3)
    np.testing.assert_array_equal(idx, np.random.RandomState(3).choice(1000, 100, replace=False))
    assert M.draw_indices(10, 100, seed=0) is None


# ------------------------------------------------------------------------------- others
def test_lattice_mae_and_spacegroup_preserved():
    p = np.array([[4.0, 4.0, 4.0, 90, 90, 90], [5.0, 5.0, 5.0, 90, 90, 91]])
    r = np.array([[4.1, 4.0, 4.0, 90, 90, 90], [5.0, 5.0, 5.0, 90, 90, 90]])
    m = M.lattice_mae(p, r)
    assert m["a"] == pytest.approx(0.05) and m["gamma"] == pytest.approx(0.5) and m["n"] == 2
    sp = M.spacegroup_preserved(np.array([221, 1, 221]), np.array([221, 221, 221]), [1, 1, 0])
    assert sp["spacegroup_preserved"] == pytest.approx(1 / 3)


def test_spacegroup_distribution_and_timing_and_conditional():
    d = M.spacegroup_distribution(np.array([221, 221, 99, 0]), np.array([221, 99]))
    assert d["samples"]["221"] == 0.5
    assert d["total_variation"] == pytest.approx(0.25)
    assert M.time_per_valid_structure(10.0, 4) == 2.5
    assert M.time_per_valid_structure(None, 4) is None
    c = M.conditional_metrics(
        np.array([1.0, 2.0, np.nan, 5.0]), np.full(4, 1.5), np.array([1, 1, 1, 0], bool), 0.6
    )
    assert c["property_mae"] == pytest.approx(0.5)
    assert c["property_hit_rate"] == pytest.approx(2 / 3)  # the NaN sample counts as a miss


def test_stability_hook():
    crystals = [perovskite(4.0), perovskite(4.4), None]
    r = M.stability_rate(crystals, lambda c: c.cell[0, 0] < 4.2)
    assert r == {"rate": 0.5, "n_stable": 1, "n": 2}


# ---------------------------------------------------------------------- fingerprints
def test_fingerprints_cached_on_disk(tmp_path, monkeypatch):
    import eval.fingerprints as F

    crystals = [perovskite(4.0), rock_salt(5.6), perovskite(4.0)]  # a duplicate
    fps, ok = structure_fingerprints(crystals, workers=1, cache_dir=tmp_path, progress=False)
    assert fps.shape == (3, 61) and ok.all()
    np.testing.assert_array_equal(fps[0], fps[2])
    comp, cok = composition_fingerprints(crystals, workers=1, cache_dir=tmp_path, progress=False)
    assert comp.shape == (3, 132) and cok.all()
    files = sorted(tmp_path.glob("*.npz"))
    assert {f.name.split("-")[0] for f in files} == {"crystalnn", "magpie"}
    for f in files:  # plain arrays, no pickled objects
        with np.load(f, allow_pickle=False) as z:
            assert set(z.files) == {"keys", "values", "ok", "meta"}

    def boom(items):
        raise AssertionError("recomputed instead of reading the cache")

    monkeypatch.setattr(F, "_crystalnn_chunk", boom)
    monkeypatch.setattr(F, "_magpie_chunk", boom)
    fps2, _ = structure_fingerprints(crystals, workers=1, cache_dir=tmp_path, progress=False)
    comp2, _ = composition_fingerprints(crystals, workers=1, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(fps, fps2)
    np.testing.assert_array_equal(comp, comp2)
    # A changed structure is a cache miss.
    with pytest.raises(AssertionError, match="recomputed"):
        structure_fingerprints([perovskite(4.01)], workers=1, cache_dir=tmp_path, progress=False)


def test_fingerprint_cache_ignores_damaged_files(tmp_path):
    (tmp_path / "crystalnn-broken.npz").write_bytes(b"not an npz")
    with pytest.warns(UserWarning, match="unreadable"):
        assert FingerprintCache(tmp_path).load("crystalnn") == {}


def test_crystalnn_fingerprint_is_invariant():
    c = perovskite(4.0)
    fps, _ = structure_fingerprints(
        [c, rotated_shifted(c, 0)], workers=1, use_cache=False, progress=False
    )
    np.testing.assert_allclose(fps[0], fps[1], atol=1e-8)
    # A distorted cell has a different fingerprint.
    d = c.replace(cell=lattice_params_to_cell(np.array([4.0, 4.3, 3.8, 80, 95, 100])))
    fd, _ = structure_fingerprints([d], workers=1, use_cache=False, progress=False)
    assert np.linalg.norm(fd[0] - fps[0]) > 0.05
