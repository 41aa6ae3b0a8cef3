"""CSP metrics (DiffCSP's protocol) on hand-made cases, against StructureMatcher itself."""

from __future__ import annotations

import json
import warnings

import ase.io
import numpy as np
import pytest
from ase.build import bulk
from pymatgen.analysis.structure_matcher import StructureMatcher

from autoperi_jax import cli
from autoperi_jax.crystal import Crystal
from eval.csp import csp_metrics, group_predictions, single_answer_ceiling
from eval.evaluate import EvalOptions, evaluate
from eval.samples import StructureSet


def _c(atoms, name: str, seed: int | None = None, strain: float = 0.0) -> Crystal:
    atoms = atoms.copy()
    if seed is not None:
        atoms.positions += np.random.default_rng(seed).normal(0, 0.05, atoms.positions.shape)
    if strain:
        atoms.set_cell(atoms.cell * (1 + strain), scale_atoms=True)
    return Crystal.from_ase(atoms, name=name)


ROCKSALT = bulk("NaCl", "rocksalt", a=5.64)
CSCL_NACL = bulk("NaCl", "cesiumchloride", a=3.35)  # same atoms, another structure
SI = bulk("Si", "diamond", a=5.43)
SI_BCC = bulk("Si", "bcc", a=3.1) * (2, 1, 1)  # 2 Si atoms, another structure


@pytest.fixture(scope="module")
def case():
    refs = [_c(ROCKSALT, "nacl"), _c(SI, "si")]
    preds = [  # k = 2 per test crystal, in an order the names (not the file) define
        _c(SI, "si#1", strain=0.03),  # a strained copy: matches
        _c(ROCKSALT, "nacl#0", seed=0),  # a perturbed copy: matches
        _c(CSCL_NACL, "nacl#1"),  # another structure: no match
        _c(SI_BCC, "si#0"),  # another structure: no match
    ]
    return preds, refs


def _direct(pred: Crystal, ref: Crystal) -> float | None:
    m = StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = m.get_rms_dist(pred.to_pymatgen(), ref.to_pymatgen())
    return None if r is None else float(r[0])


def test_match_rate_and_rmse_equal_structure_matcher(case):
    preds, refs = case
    groups = group_predictions([p.name for p in preds], [r.name for r in refs])
    assert groups == [[1, 2], [3, 0]]
    ok = np.ones(len(preds), bool)
    res = csp_metrics(preds, refs, groups, ok, np.ones(2, bool), ks=(1, 2), progress=False)
    direct = {p.name: _direct(p, refs[0 if p.name.startswith("nacl") else 1]) for p in preds}
    assert direct["nacl#1"] is None and direct["si#0"] is None
    assert direct["nacl#0"] is not None and direct["si#1"] is not None
    assert res["match_rate_k1"] == 0.5 and res["n_matched_k1"] == 1
    assert res["rmse_k1"] == pytest.approx(direct["nacl#0"], abs=1e-12)
    assert res["match_rate_k2"] == 1.0
    assert res["rmse_k2"] == pytest.approx((direct["nacl#0"] + direct["si#1"]) / 2, abs=1e-12)


def test_validity_rules(case):
    """k = 1 needs the reference valid too (RecEval); k > 1 only the predictions."""
    preds, refs = case
    groups = group_predictions([p.name for p in preds], [r.name for r in refs])
    ref_ok = np.array([False, True])
    res = csp_metrics(preds, refs, groups, np.ones(4, bool), ref_ok, ks=(1, 2), progress=False)
    assert res["match_rate_k1"] == 0.0 and res["match_rate_k2"] == 1.0
    pred_ok = np.array([False, True, True, True])  # si#1, the only Si match, invalid
    res = csp_metrics(preds, refs, groups, pred_ok, np.ones(2, bool), ks=(2,), progress=False)
    assert res["match_rate_k2"] == 0.5
    with pytest.raises(ValueError, match="fewer than k = 3"):
        csp_metrics(preds, refs, groups, pred_ok, np.ones(2, bool), ks=(3,), progress=False)


def test_prediction_names_are_checked():
    with pytest.raises(ValueError, match="named 'x': CSP predictions are named 'ID#j'"):
        group_predictions(["x"], ["a"])
    with pytest.raises(ValueError, match="names no crystal"):
        group_predictions(["b#0"], ["a"])


def test_single_answer_ceiling_counts_polymorphs():
    refs = [_c(ROCKSALT, "a"), _c(CSCL_NACL, "b"), _c(ROCKSALT, "c", seed=1), _c(SI, "d")]
    got = single_answer_ceiling(refs, np.ones(4, bool), progress=False)
    # NaCl: 3 structures, one answer matches at most the two rock-salt ones; Si: 1 of 1
    assert got["compositions"] == 2 and got["compositions_with_polymorphs"] == 1
    assert got["crystals_in_polymorph_groups"] == 3
    assert got["match_rate_ceiling_k1"] == pytest.approx(3 / 4)


def test_eval_cli_csp(case, tmp_path):
    preds, refs = case
    ase.io.write(tmp_path / "p.extxyz", [_named(p) for p in preds])
    ase.io.write(tmp_path / "r.extxyz", [_named(r) for r in refs])
    args = ["eval", "--task", "csp", "--samples", str(tmp_path / "p.extxyz"), "--reference",
            str(tmp_path / "r.extxyz"), "--k", "1,2", "--out", str(tmp_path / "o"), "--no-plots",
            "--quiet"]  # fmt: skip
    assert cli.main(args) == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["options"]["csp_ks"] == [1, 2] and m["options"]["match_tolerances"]["ltol"] == 0.3
    assert (m["metrics"]["match_rate_k1"], m["metrics"]["match_rate_k2"]) == (0.5, 1.0)
    assert m["metrics"]["composition_kept_rate"] == 1.0
    report = (tmp_path / "o" / "report.md").read_text()
    assert "Match rate, k = 2" in report
    ceiling = m["metrics"]["match_rate_ceiling_k1"]
    assert f"the k = 1 ceiling, {100 * ceiling:.2f} %" in report
    assert cli.main([*args[:-4], "--k", "0", "--out", str(tmp_path / "o2")]) == 2


def test_evaluate_csp_end_to_end(case):
    preds, refs = case
    ss = StructureSet(preds, [p.name for p in preds], [None] * 4, "preds")
    rs = StructureSet(refs, [r.name for r in refs], [None] * 2, "refs")
    r = evaluate(ss, rs, EvalOptions(task="csp", csp_ks=(1, 2)), progress=False)
    assert r.metrics["match_rate_k2"] == 1.0 and r.metrics["reference_validity"] == 1.0


def _named(c: Crystal):
    atoms = c.to_ase()
    atoms.info["name"] = c.name
    return atoms
