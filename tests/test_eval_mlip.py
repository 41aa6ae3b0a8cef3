"""The MLIP stability judge (eval.mlip) against independent truths.

Without torch / CHGNet (the optional ``stability`` extra) the relaxation tests skip; the
hull, cache and key tests run everywhere. Relaxations run in this process (workers=0) on
2- and 4-atom cells, except the slow worker-process test.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from autoperi_jax.crystal import Crystal
from eval import mlip


@pytest.fixture(scope="module")
def chgnet():
    pytest.importorskip("torch")
    return pytest.importorskip("chgnet")


def _rocksalt(a: float = 5.64) -> Crystal:
    """NaCl, primitive fcc cell (2 atoms)."""
    cell = 0.5 * a * np.array([[0, 1, 1], [1, 0, 1], [1, 1, 0]], float)
    return Crystal(cell, np.array([[0, 0, 0], [0.5, 0.5, 0.5]]), np.array([11, 17]))


# ---------------------------------------------------------------------------- hull
def test_hull_equals_pymatgen_phase_diagram_on_total_energies():
    """Two elements with arbitrary elemental energies: E_hull from formation energies
    equals pymatgen's PhaseDiagram on total energies, and a hand computation."""
    from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
    from pymatgen.core import Composition

    mu = {"Li": -1.9, "O": -4.9}
    known = {"Li2O": -2.07, "LiO": -1.5, "LiO2": -0.9, "Li3O": -0.3}  # formation eV/atom
    hull = mlip.FormationHull(list(known), list(known.values()), "hand-made")

    def total(formula, e_form):
        c = Composition(formula)
        return e_form * c.num_atoms + sum(mu[el.symbol] * n for el, n in c.items())

    pd = PhaseDiagram(
        [PDEntry(Composition(el), e) for el, e in mu.items()]
        + [PDEntry(Composition(f), total(f, e)) for f, e in known.items()]
    )
    for f, e in [("Li2O", -2.07), ("LiO", -1.5), ("Li3O", -0.3), ("LiO3", -0.5),
                 ("Li2O", -2.5), ("Li", 0.2), ("LiO", -1.2)]:  # fmt: skip
        want = pd.get_e_above_hull(PDEntry(Composition(f), total(f, e)), allow_negative=True)
        assert hull.e_above_hull(f, e) == pytest.approx(want, abs=1e-9), f
    # by hand: the hull between Li2O (x_O = 1/3, -2.07) and O (x_O = 1, 0) at x_O = 1/2
    # is -2.07 * (1 - 1/2) / (1 - 1/3) = -1.5525, so LiO at -1.5 sits 0.0525 above it
    assert hull.e_above_hull("LiO", -1.5) == pytest.approx(0.0525, abs=1e-9)
    assert hull.e_above_hull("Li2O", -2.5) == pytest.approx(-0.43, abs=1e-9)  # below
    assert np.isnan(hull.e_above_hull("LiO", float("nan")))
    # another chemical system is its own hull: only the elements at 0
    assert hull.e_above_hull("NaCl", -0.4) == pytest.approx(-0.4)


# ---------------------------------------------------------------- keys and cache
def test_structure_key_ignores_wrapping_not_settings():
    c = _rocksalt()
    s = mlip.RelaxSettings()
    moved = Crystal(c.cell, c.frac_coords + np.array([1.0, 0.0, -1.0]), c.numbers)
    assert mlip.structure_key(moved, s) == mlip.structure_key(c, s)
    assert mlip.structure_key(c, mlip.RelaxSettings(fmax=0.1)) != mlip.structure_key(c, s)
    other = Crystal(c.cell * 1.01, c.frac_coords, c.numbers)
    assert mlip.structure_key(other, s) != mlip.structure_key(c, s)


def test_cache_skips_done_work_and_survives_an_interrupted_write(tmp_path, monkeypatch):
    calls = []

    def fake(crystal, settings):
        calls.append(crystal.num_atoms)
        return {"ok": True, "error": None, "energy_per_atom": -1.0 * crystal.num_atoms}

    monkeypatch.setattr(mlip, "relax_one", fake)
    a, b = _rocksalt(), _rocksalt(6.0)
    path = tmp_path / "cache.jsonl"
    # an interrupted run: a's line complete, the next line cut off mid-write
    key_a = mlip.structure_key(a, mlip.RelaxSettings())
    path.write_text(json.dumps({"key": key_a, "record": {"ok": True, "from": "before"}})
                    + '\n{"key": "abc", "rec')  # fmt: skip
    recs = mlip.relax_structures([a, b, b], ["a", "b", "b2"], workers=0, cache=path,
                                 progress=False)  # fmt: skip
    assert calls == [2]  # only b, once although given twice
    assert recs[0]["from"] == "before" and recs[0]["cached"] and recs[0]["name"] == "a"
    assert not recs[1]["cached"] and [r["name"] for r in recs] == ["a", "b", "b2"]
    assert recs[2]["energy_per_atom"] == -2.0
    again = mlip.relax_structures([a, b], workers=0, cache=path, progress=False)
    assert calls == [2] and all(r["cached"] for r in again)
    assert len(mlip.RelaxCache(path)) == 2


def test_summarize_counts_failures_and_sun():
    recs = [
        {"ok": True, "formula": "LiO", "formation_energy_per_atom": -1.6, "relaxed_match": True,
         "rmsd": 0.1, "converged": True, "energy_per_atom": -4.0},
        {"ok": True, "formula": "LiO", "formation_energy_per_atom": -1.3, "relaxed_match": False,
         "rmsd": None, "converged": True, "energy_per_atom": -3.0},
        {"ok": False, "formula": "LiO", "error": "boom"},
    ]  # fmt: skip
    hull = mlip.FormationHull(["Li2O"], [-2.07])
    m, arr = mlip.summarize(recs, hull)
    assert m["stability_n"] == 3 and m["stability_n_failed"] == 1
    assert m["stability_relaxed_match_rate"] == pytest.approx(1 / 3)
    assert m["stability_rmsd_mean"] == pytest.approx(0.1)
    np.testing.assert_allclose(arr["e_hull"][:2], [-0.0475, 0.2525], atol=1e-9)
    assert m["stable_rate"] == pytest.approx(1 / 3) and m["stable_rate_0"] == pytest.approx(1 / 3)
    assert "sun_rate" not in m  # no train split: novelty unknown
    assert mlip.below_rate(arr["e_hull"], 0.0) == pytest.approx(1 / 3)


def test_formation_energy_uses_the_lowest_elemental_energy():
    pytest.importorskip("chgnet")  # the references ship with matcalc, part of the extra
    refs = mlip.elemental_energies("MP-PBE")
    assert len(refs) == 88 and "Yb" not in refs
    e = mlip.formation_energy_per_atom([11, 17], -3.5, refs)
    assert e == pytest.approx(-3.5 - (refs["Na"] + refs["Cl"]) / 2)
    assert np.isnan(mlip.formation_energy_per_atom([70, 8], -5.0, refs))  # no Yb reference


# -------------------------------------------------------------------- relaxations
@pytest.fixture(scope="module")
def relaxed_nacl(chgnet):
    rec = mlip.relax_one(_rocksalt(), mlip.RelaxSettings())
    assert rec["ok"], rec["error"]
    return mlip.relaxed_crystal(rec), rec


def test_crystal_at_its_minimum_stays_put(relaxed_nacl):
    c, first = relaxed_nacl
    rec = mlip.relax_one(c, mlip.RelaxSettings())
    assert rec["ok"] and rec["converged"] and rec["relaxed_match"]
    assert rec["steps"] <= 3 and rec["rmsd"] < 1e-3
    assert abs(rec["volume_change"]) < 1e-3
    assert rec["energy_per_atom"] == pytest.approx(first["energy_per_atom"], abs=1e-4)
    # CHGNet's NaCl: formation energy near MP's DFT value (-2.1 eV/atom)
    assert -2.4 < rec["formation_energy_per_atom"] < -1.8


def test_compressed_copy_relaxes_back(relaxed_nacl):
    from autoperi_jax.distinct import matcher
    from autoperi_jax.protocol import CDVAE_MATCHER

    c, first = relaxed_nacl
    squeezed = Crystal(c.cell * 0.9, c.frac_coords, c.numbers)  # volume x 0.73
    rec = mlip.relax_one(squeezed, mlip.RelaxSettings())
    assert rec["ok"] and rec["converged"] and rec["steps"] > 0
    back = mlip.relaxed_crystal(rec)
    assert back.volume == pytest.approx(c.volume, rel=0.03)
    assert matcher(CDVAE_MATCHER).fit(back.to_pymatgen(), c.to_pymatgen())
    assert rec["energy_per_atom"] == pytest.approx(first["energy_per_atom"], abs=2e-3)


def test_known_stable_mp20_crystal_sits_near_the_hull(chgnet):
    """ScAlRh2 (mp-867922, MP-20 test, e_above_hull 0 in MP): 4 atoms."""
    import pandas as pd

    from autoperi_jax.datasets import resolve_dataset

    df = pd.read_csv(resolve_dataset("mp_20:test"))
    row = df[df.material_id == "mp-867922"].iloc[0]
    assert row.e_above_hull == 0.0
    c = Crystal.from_cif(row.cif)
    hull = mlip.mp20_hull()
    assert hull.n_entries > 45_000
    [rec] = mlip.relax_structures([c], [row.material_id], workers=0, progress=False)
    assert rec["ok"] and rec["converged"] and rec["relaxed_match"]
    assert rec["formation_energy_per_atom"] == pytest.approx(row.formation_energy_per_atom, abs=0.1)
    m, arr = mlip.summarize([rec], hull)
    assert abs(arr["e_hull"][0]) < 0.1 and m["stable_rate"] == 1.0


def test_a_failing_structure_is_recorded_with_its_name(chgnet, tmp_path):
    lone = Crystal(np.eye(3) * 20.0, np.zeros((1, 3)), np.array([1]))  # no neighbour
    recs = mlip.relax_structures(
        [lone, _rocksalt()], ["lonely-H", "nacl"], workers=0,
        cache=tmp_path / "c.jsonl", progress=False,
    )  # fmt: skip
    assert not recs[0]["ok"] and recs[0]["name"] == "lonely-H"
    assert "isolated" in recs[0]["error"].lower()
    assert recs[1]["ok"]
    m, _ = mlip.summarize(recs)
    assert m["stability_n_failed"] == 1 and m["stability_n"] == 2


@pytest.mark.slow
def test_worker_processes_give_the_in_process_result(relaxed_nacl, tmp_path):
    c, _ = relaxed_nacl
    crystals = [c, Crystal(c.cell * 0.95, c.frac_coords, c.numbers)]
    pooled = mlip.relax_structures(crystals, workers=2, progress=False)
    local = mlip.relax_structures(crystals, workers=0, progress=False)
    for p, q in zip(pooled, local):
        assert p["energy_per_atom"] == pytest.approx(q["energy_per_atom"], abs=1e-5)
        assert p["steps"] == q["steps"]


def test_eval_cli_reports_the_judge_beside_the_reference(chgnet, tmp_path):
    """`autoperi eval --stability chgnet` on three small stable MP-20 test crystals, as
    samples, reference and train: every figure has its reference twin, the protocol is in
    metrics.json, nothing is novel so S.U.N. is 0."""
    import pandas as pd

    from autoperi_jax.cli import main
    from autoperi_jax.datasets import resolve_dataset

    df = pd.read_csv(resolve_dataset("mp_20:test"), nrows=400)
    small = df[(df.e_above_hull == 0) & df.cif.map(lambda c: len(Crystal.from_cif(c).numbers) <= 4)]
    small.iloc[:3].to_csv(tmp_path / "ref.csv", index=False)
    out = tmp_path / "out"
    code = main([
        "eval", "--task", "gen", "--samples", str(tmp_path / "ref.csv"),
        "--reference", str(tmp_path / "ref.csv"), "--dataset-name", "mp_20",
        "--stability", "chgnet", "--stability-samples", "2", "--stability-workers", "0",
        "--stability-train", str(tmp_path / "ref.csv"), "--stability-hull", "mp_20",
        "--stability-cache", str(tmp_path / "relax.jsonl"), "--num-draw", "2",
        "--num-seeds", "1", "--no-plots", "--workers", "1", "--quiet", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    payload = json.loads((out / "metrics.json").read_text())
    m = payload["metrics"]
    assert m["stability_n"] == m["stability_n_reference"] == 2
    for k in ("stability_relaxed_match_rate", "stability_rmsd_mean", "stable_rate",
              "stable_rate_0", "sun_rate", "sun_rate_0", "stability_energy_per_atom_mean",
              "stability_formation_energy_median", "stability_ehull_below_ref_rate"):  # fmt: skip
        assert m[k] is not None and m[f"{k}_reference"] is not None, k
    assert m["stable_rate"] == 1.0 and m["sun_rate"] == 0.0  # all stable, none novel
    proto = payload["options"]["stability_protocol"]
    assert proto["relaxation"]["fmax"] == 0.05 and "45,2" in proto["hull"]
    assert proto["sun_anchors"]["values"]["MatterGen (trained on MP-20)"] == 0.2227
    report = (out / "report.md").read_text()
    assert "## Stability (MLIP judge)" in report and "S.U.N. anchors on MP-20" in report
    assert "| Stable: E_hull <= 0.1 eV/atom (%) | 100.00 | 100.00 |" in report
    assert len(mlip.RelaxCache(tmp_path / "relax.jsonl")) >= 2
