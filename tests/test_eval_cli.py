"""``autoperi eval`` end to end on small Perov-5 files: metrics.json, report.md, plots."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from autoperi_jax.cli import build_parser, main
from autoperi_jax.crystal import Crystal, write_structures
from autoperi_jax.datasets import resolve_dataset
from eval.samples import load_structure_set

N_REF = 40
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 40-row reference CSV, samples = those crystals plus one with overlapping atoms."""
    d = tmp_path_factory.mktemp("eval_cli")
    df = pd.read_csv(resolve_dataset("perov_5:test")).iloc[:N_REF]
    df.to_csv(d / "ref.csv", index=False)
    ref = load_structure_set(d / "ref.csv", workers=1, progress=False)
    crystals = list(ref.crystals)
    frac = [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0.58], [0.5, 0, 0.5], [0, 0.5, 0.5]]
    crystals.append(Crystal(np.eye(3) * 4.0, frac, [38, 22, 8, 8, 8], name="overlap"))
    write_structures(crystals, d / "samples.extxyz")
    # Reconstructions in reverse order, named like the references.
    write_structures(ref.crystals[::-1], d / "recon.extxyz")
    write_structures(ref.crystals[:5], d / "cifs")
    return d


def _run(args) -> int:
    return main(["eval", *args, "--workers", "1", "--quiet"])


def test_gen_writes_metrics_report_and_plots(files, capsys):
    out = files / "out_gen"
    code = _run([
        "--task", "gen", "--samples", str(files / "samples.extxyz"),
        "--reference", str(files / "ref.csv"), "--train", str(files / "ref.csv"),
        "--dataset-name", "perov_5", "--num-draw", "10", "--num-seeds", "3",
        "--out", str(out), "--sampling-time-s", "82",
    ])  # fmt: skip
    assert code == 0
    assert "report:" in capsys.readouterr().out
    payload = json.loads((out / "metrics.json").read_text())
    m, opts = payload["metrics"], payload["options"]
    assert m["n_samples"] == N_REF + 1
    assert m["struct_validity"] == pytest.approx(N_REF / (N_REF + 1))
    assert m["cov_recall"] == 1.0
    assert payload["details"]["cov_recall_misses"] == []
    assert m["cov_precision"] == pytest.approx(N_REF / (N_REF + 1))  # COV-P over ALL samples
    assert m["novelty"] == 0.0
    assert m["time_per_valid_structure_s"] == pytest.approx(82 / m["n_valid"])
    for k in ("struct_validity", "comp_validity", "validity", "cov_recall", "cov_precision",
              "uniqueness", "novelty", "unique_novel_rate"):  # fmt: skip
        assert 0.0 <= m[k] <= 1.0, k
    assert opts["match_tolerances"] == {"stol": 0.5, "ltol": 0.3, "angle_tol": 10.0}
    assert (opts["struct_cutoff"], opts["comp_cutoff"]) == (0.2, 4.0)
    assert (opts["n_draw"], opts["num_seeds"], opts["property"]) == (10, 3, "heat_ref")
    assert len(payload["details"]["emd"]["density"]["values"]) == 3
    cdvae = payload["published"]["models"]["CDVAE"]
    assert cdvae["values"]["comp_validity"] == 0.9859 and "ICLR 2022" in cdvae["source"]
    report = (out / "report.md").read_text()
    assert "| Metric | autoperi-jax | CDVAE | DiffCSP | FlowMM |" in report
    assert "| COV-R (%) | 100.00 | 99.45 | 99.74 |" in report
    assert "Every reference crystal is covered by some sample" in report
    from eval.report import render_markdown

    payload["details"]["cov_recall_misses"] = [
        {"name": "mp-1", "struct_distance": 0.25, "comp_distance": 1.5}
    ]
    assert "no sample covers (1; nearest structure / composition distance, cut-offs 0.2 / " \
        "4.0): mp-1 (0.250 / 1.50)" in render_markdown(payload, [])  # fmt: skip
    for name in ("density", "property", "lattice", "spacegroups", "atoms_per_cell", "structures"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000, name
        assert f"({name}.png)" in report


def test_recon_aligns_by_name(files):
    out = files / "out_recon"
    code = _run([
        "--task", "recon", "--samples", str(files / "recon.extxyz"),
        "--reference", str(files / "ref.csv"), "--out", str(out), "--no-plots",
    ])  # fmt: skip
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    assert m["alignment"] == "name"
    assert m["match_rate"] == m["match_rate_ceiling"] > 0.9
    assert m["rmse"] < 1e-6
    assert m["spacegroup_preserved"] == 1.0
    assert "Match rate (%)" in (out / "report.md").read_text()


def test_cif_folder_samples_and_bad_input(files, capsys):
    ss = load_structure_set(files / "cifs", progress=False)
    assert len(ss) == 5 and ss.n_unreadable == 0
    code = _run([
        "--task", "gen", "--samples", str(files / "missing.extxyz"),
        "--reference", str(files / "ref.csv"), "--out", str(files / "out_bad"),
    ])  # fmt: skip
    assert code == 2
    assert "autoperi eval: error" in capsys.readouterr().err


def test_unreadable_entries_are_kept_as_invalid(tmp_path):
    df = pd.DataFrame({"material_id": ["a", "b"], "cif": ["not a cif", ""]})
    df.to_csv(tmp_path / "bad.csv", index=False)
    ss = load_structure_set(tmp_path / "bad.csv", workers=1, progress=False)
    assert ss.crystals == [None, None] and ss.names == ["a", "b"]
    assert all("malformed" in e or "empty" in e for e in ss.errors)


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["eval", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "--task {recon,gen,cond,csp}" in text
