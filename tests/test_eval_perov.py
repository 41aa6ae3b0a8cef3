"""Known answers on the real Perov-5 test split: SMACT failures, self-evaluation, recon."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from eval import metrics as M
from eval.evaluate import EvalOptions, evaluate
from eval.samples import StructureSet, load_structure_set

# The 53 Perov-5 test crystals (material_id) that fail CDVAE's compositional-validity test,
# as computed by CDVAE's smact_validity on SMACT 2.2.1 (and 2.5.5: same list).
SMACT_FAILURES = {
    "16593", "12605", "14595", "10978", "13306", "11110", "13797", "11439", "6660", "12055",
    "14302", "7504", "15045", "13364", "12642", "12164", "12406", "7440", "10825", "11833",
    "17189", "15244", "14220", "12271", "15093", "15335", "13474", "17245", "12631", "18118",
    "5449", "11656", "11818", "11116", "17334", "11347", "17370", "12328", "12364", "15757",
    "18117", "14330", "11701", "12530", "12614", "5499", "17783", "11355", "15641", "13679",
    "13472", "16459", "16264",
}  # fmt: skip


@pytest.fixture(scope="module")
def perov_test_set() -> StructureSet:
    return load_structure_set("perov_5:test", workers=1, progress=False)


def _subset(ss: StructureSet, idx) -> StructureSet:
    idx = list(idx)
    return StructureSet(
        [ss.crystals[i] for i in idx], [ss.names[i] for i in idx], [None] * len(idx), ss.source
    )


@pytest.fixture(scope="module")
def mixed_subset(perov_test_set) -> StructureSet:
    """97 SMACT-valid and 3 SMACT-invalid test crystals, in file order."""
    ok = [i for i, n in enumerate(perov_test_set.names) if n not in SMACT_FAILURES][:97]
    bad = [i for i, n in enumerate(perov_test_set.names) if n in SMACT_FAILURES][:3]
    return _subset(perov_test_set, sorted(ok + bad))


def test_53_named_perov5_test_crystals_fail_smact(perov_test_set):
    assert len(perov_test_set) == 3785 and perov_test_set.n_unreadable == 0
    failing = {
        n for n, c in zip(perov_test_set.names, perov_test_set.crystals)
        if not M.smact_validity(c.numbers)
    }  # fmt: skip
    assert failing == SMACT_FAILURES


def _gen_options(**kw) -> EvalOptions:
    base = dict(task="gen", dataset_name="perov_5", property="heat_ref", n_draw=50, num_seeds=3)
    base.update(kw)
    return EvalOptions(**base)


def test_subset_evaluated_against_itself(mixed_subset):
    res = evaluate(mixed_subset, mixed_subset, _gen_options(), train=mixed_subset, workers=1,
                   progress=False)  # fmt: skip
    m = res.metrics
    assert m["struct_validity"] == 1.0
    assert m["comp_validity"] == pytest.approx(0.97)
    assert m["validity"] == pytest.approx(0.97)
    assert m["cov_recall"] == 1.0 and m["cov_precision"] == 1.0
    assert m["amsd_recall"] == 0.0 and m["amcd_precision"] == 0.0
    assert m["uniqueness"] == 1.0
    assert m["novelty"] == 0.0 and m["unique_novel_rate"] == 0.0
    assert m["novelty_distance_struct"] == 0.0 and m["novelty_distance_comp"] == 0.0
    assert set(res.details["reference_comp_invalid"]) <= SMACT_FAILURES
    assert len(res.details["reference_comp_invalid"]) == 3
    for k, v in m.items():
        if k.endswith(("validity", "_rate", "uniqueness", "novelty")) or k.startswith("cov_"):
            assert 0.0 <= v <= 1.0, k
    # CDVAE compares VALID samples with ALL reference crystals, so the 3 SMACT failures
    # make the all-valid density EMD small but not zero; check it against scipy directly.
    structures = [c.to_pymatgen() for c in mixed_subset.crystals]
    dens = np.array([s.density for s in structures])
    valid = np.array([n not in SMACT_FAILURES for n in mixed_subset.names])
    expected = wasserstein_distance(dens[valid], dens)
    assert m["emd_density_all_valid"] == pytest.approx(expected, rel=1e-12)
    assert m["emd_density_all_valid"] > 0


def test_valid_subset_has_zero_emd_on_all_valid_samples(mixed_subset):
    keep = [i for i, n in enumerate(mixed_subset.names) if n not in SMACT_FAILURES]
    valid_only = _subset(mixed_subset, keep)
    res = evaluate(valid_only, valid_only, _gen_options(), workers=1, progress=False)
    m = res.metrics
    assert m["validity"] == 1.0 and m["comp_validity"] == 1.0
    assert m["emd_density_all_valid"] == 0.0
    assert m["emd_num_elements_all_valid"] == 0.0
    assert m["emd_property_all_valid"] == 0.0
    assert m["cov_recall"] == 1.0 and m["cov_precision"] == 1.0
    # The 50-sample draws are a subset, so their EMD is positive: the draw noise CDVAE has.
    assert m["emd_density"] > 0 and m["emd_density_std"] > 0


def test_reconstruction_of_identical_predictions(mixed_subset):
    res = evaluate(mixed_subset, mixed_subset, EvalOptions(task="recon"), workers=1,
                   progress=False)  # fmt: skip
    m = res.metrics
    assert m["match_rate_ceiling"] == pytest.approx(0.97)
    assert m["match_rate"] == m["match_rate_ceiling"]
    assert m["rmse"] < 1e-6
    assert m["spacegroup_preserved"] == 1.0
    assert m["lattice_mae"]["lengths"] == 0.0 and m["lattice_mae"]["n"] == 100
    assert m["alignment"] == "name"


@pytest.mark.slow
def test_full_perov5_test_split_against_itself(perov_test_set):
    """All 3,785 test crystals (CrystalNN fingerprints of every one: minutes on 2 cores)."""
    opts = _gen_options(n_draw=1000, num_seeds=10)
    res = evaluate(perov_test_set, perov_test_set, opts, progress=False)
    m = res.metrics
    assert m["struct_validity"] == 1.0
    assert m["comp_validity"] == pytest.approx((3785 - 53) / 3785)
    assert set(res.details["reference_comp_invalid"]) == SMACT_FAILURES
    assert m["n_fingerprint_failed"] == 0
    assert m["cov_recall"] == 1.0 and m["cov_precision"] == 1.0
    assert m["uniqueness"] == pytest.approx(1.0, abs=0.01)
    # Valid samples vs ALL reference crystals (CDVAE): only the 53 SMACT failures separate
    # the two sets, so the all-valid EMDs are those of removing them; computed here directly.
    valid = np.array([n not in SMACT_FAILURES for n in perov_test_set.names])
    structures = [c.to_pymatgen() for c in perov_test_set.crystals]
    dens = np.array([s.density for s in structures])
    n_el = np.array([len(set(s.species)) for s in structures], float)
    prop = perov_test_set.property_values("heat_ref")
    for key, x in (("density", dens), ("num_elements", n_el), ("property", prop)):
        expected = wasserstein_distance(x[valid], x)
        assert m[f"emd_{key}_all_valid"] == pytest.approx(expected, rel=1e-9, abs=1e-12), key
    assert m["emd_density_all_valid"] > 0


def test_novel_p1_share_is_spglibs_p1_share_of_the_novel_samples(mixed_subset):
    """Samples: 30 test crystals, the first 10 rattled by 0.15 A (mostly P1); train: the
    crystals from the 21st on, so the first 20 are novel. The share of P1 among the novel
    valid samples must equal spglib's own count (pymatgen SpacegroupAnalyzer, symprec 0.1)."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    from autoperi_jax.crystal import Crystal

    rng = np.random.default_rng(0)
    crystals = []
    for i, c in enumerate(mixed_subset.crystals[:30]):
        if i < 10:
            shift = rng.normal(0.0, 0.15, c.frac_coords.shape) @ np.linalg.inv(c.cell)
            c = Crystal(c.cell, c.frac_coords + shift, c.numbers, name=c.name)
        crystals.append(c)
    samples = StructureSet(crystals, mixed_subset.names[:30], [None] * 30, "rattled")
    train = _subset(mixed_subset, range(20, len(mixed_subset)))
    opts = _gen_options(n_draw=10, novelty_distance=False)  # no train fingerprints
    res = evaluate(samples, mixed_subset, opts, train=train, workers=1, progress=False)
    assert "novelty_distance_struct" not in res.metrics and res.metrics["n_train"] == 80
    valid = [M.smact_validity(c.numbers) and M.structure_validity(c) for c in crystals[:20]]
    groups = [
        SpacegroupAnalyzer(c.to_pymatgen(), symprec=0.1).get_space_group_symbol()
        for c, ok in zip(crystals[:20], valid)
        if ok
    ]
    assert res.metrics["novelty"] == pytest.approx(sum(valid) / sum(
        M.smact_validity(c.numbers) and M.structure_validity(c) for c in crystals
    ))  # fmt: skip
    p1 = sum(g == "P1" for g in groups)
    assert p1 > 0 and p1 < len(groups)  # both kinds present: the check can fail
    assert res.metrics["novel_p1_share"] == pytest.approx(p1 / len(groups))
    # --no-uniqueness (one-element data): no uniqueness figures, every other one unchanged
    opts = dataclasses.replace(opts, uniqueness=False)
    res2 = evaluate(samples, mixed_subset, opts, train=train, workers=1, progress=False)
    assert {"uniqueness", "unique_novel_rate"} <= set(res.metrics)
    assert not {"uniqueness", "unique_novel_rate"} & set(res2.metrics)
    for k in ("validity", "cov_recall", "cov_precision", "novelty", "novel_p1_share"):
        assert res2.metrics[k] == res.metrics[k], k
