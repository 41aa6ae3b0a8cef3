"""Reference statistics: the shipped ones equal a fresh computation, and a generation
evaluation against them equals the one against the structures."""

from __future__ import annotations

import dataclasses
import json
import math

import ase.io
import numpy as np
import pandas as pd
import pytest

from autoperi_jax import cli
from autoperi_jax.datasets import DatasetError, resolve_dataset
from eval import metrics as M
from eval.evaluate import EvalOptions, evaluate
from eval.reference import (
    ReferenceStats,
    compute_reference_stats,
    load_reference,
    reference_side,
    shipped_stats_path,
)
from eval.samples import StructureSet, load_structure_set

N = 40  # reference rows recomputed here (the whole split: the slow test below)


@pytest.fixture(scope="module")
def shipped() -> ReferenceStats:
    path = shipped_stats_path("perov_5:test")
    assert path is not None and path.parent.parent.name == "perov_5"
    return ReferenceStats.load(path)


@pytest.fixture(scope="module")
def head_csv(tmp_path_factory) -> str:
    """The first N rows of the Perov-5 test split, as a CSV."""
    path = tmp_path_factory.mktemp("ref") / "head.csv"
    pd.read_csv(resolve_dataset("perov_5:test"), nrows=N).to_csv(path, index=False)
    return str(path)


def _assert_features_equal(a: M.Features, b: M.Features) -> None:
    for f in dataclasses.fields(M.Features):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "formula":
            assert list(x) == list(y)
        else:
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-9, err_msg=f.name)


def test_shipped_stats_equal_a_fresh_computation(shipped, head_csv):
    assert len(shipped) == 3785 and shipped.n_unreadable == 0
    assert shipped.source_sha256 == (
        "2511340f0e08b25699e9386e100ae0b30cd9b9c8a5b29622c3533644e04c95fa"
    )  # the published test.csv (autoperi_jax.datasets.DATASET_FILES)
    fresh = compute_reference_stats(head_csv, progress=False, use_cache=False)
    assert shipped.names[:N] == fresh.names
    _assert_features_equal(shipped.features.subset(np.arange(N)), fresh.features)
    for k in ("struct", "struct_ok", "comp", "comp_ok"):
        a, b = getattr(shipped.fingerprints, k)[:N], getattr(fresh.fingerprints, k)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9, err_msg=k)
    assert set(shipped.properties) == set(fresh.properties) >= {"heat_ref", "dir_gap"}
    for k, v in fresh.properties.items():
        np.testing.assert_array_equal(shipped.properties[k][:N], v)


def test_save_load_roundtrip(head_csv, tmp_path):
    stats = compute_reference_stats(head_csv, progress=False, use_cache=False)
    back = ReferenceStats.load(stats.save(tmp_path / "s.npz"))
    assert back.names == stats.names and back.options == stats.options
    _assert_features_equal(back.features, stats.features)
    np.testing.assert_array_equal(back.fingerprints.comp, stats.fingerprints.comp)
    with np.load(tmp_path / "s.npz", allow_pickle=False) as z:  # no object arrays
        assert all(z[k].dtype != object for k in z.files)


def test_evaluation_against_stats_equals_against_structures(head_csv):
    """Same samples, the two reference paths: every metric equal to 1e-9."""
    samples = load_structure_set("perov_5:val", limit=30, progress=False)
    ref = load_structure_set(head_csv, progress=False)
    stats = compute_reference_stats(head_csv, progress=False)
    opts = EvalOptions(task="gen", dataset_name="perov_5", property="heat_ref", n_draw=20,
                       num_seeds=3)  # fmt: skip
    a = evaluate(samples, ref, opts, progress=False)
    b = evaluate(samples, stats, opts, progress=False)
    assert a.metrics.keys() == b.metrics.keys()
    for k, x in a.metrics.items():
        y = b.metrics[k]
        if isinstance(x, float) and not (math.isnan(x) and math.isnan(y)):
            assert y == pytest.approx(x, abs=1e-9), k
        else:
            assert x == y, k
    assert json.dumps(a.details, sort_keys=True, default=str) == json.dumps(
        b.details, sort_keys=True, default=str
    )


def test_load_reference_picks_stats_only_where_they_apply(shipped, tmp_path, monkeypatch):
    local = resolve_dataset("perov_5:test", download=False)
    # the local split is the published file: statistics
    assert isinstance(load_reference("perov_5:test", progress=False), ReferenceStats)
    # no local split (and downloads off): statistics
    monkeypatch.delenv("AUTOPERI_DATA", raising=False)
    assert isinstance(load_reference("perov_5:test", progress=False), ReferenceStats)
    # a local copy with other bytes: its structures
    (tmp_path / "perov_5").mkdir()
    pd.read_csv(local, nrows=12).to_csv(tmp_path / "perov_5" / "test.csv", index=False)
    got = load_reference("perov_5:test", data_dir=tmp_path, progress=False)
    assert isinstance(got, StructureSet) and len(got) == 12
    # asked not to, or other validity options: structures (here none: a clear error)
    with pytest.raises(DatasetError, match="AUTOPERI_OFFLINE"):
        load_reference("perov_5:test", use_stats=False, progress=False)
    with pytest.warns(UserWarning, match=r"symprec 0.1 \(statistics\) vs 0.01"):
        with pytest.raises(DatasetError, match="not found locally"):
            load_reference("perov_5:test", symprec=0.01, progress=False)
    with pytest.raises(ValueError, match="do not apply: min_distance"):
        reference_side(shipped, 0.1, 0.6, 0.1)


def test_eval_cli_needs_no_dataset(tmp_path, monkeypatch):
    """``autoperi eval --task gen --reference perov_5:test`` with no data anywhere and
    downloads off: the shipped statistics stand in for the split."""
    samples = load_structure_set("perov_5:val", limit=24, progress=False)
    out_x = tmp_path / "s.extxyz"
    ase.io.write(out_x, [c.to_ase() for c in samples.crystals])
    monkeypatch.delenv("AUTOPERI_DATA", raising=False)
    args = ["eval", "--task", "gen", "--samples", str(out_x), "--reference", "perov_5:test",
            "--out", str(tmp_path / "r"), "--num-draw", "10", "--num-seeds", "2", "--no-plots",
            "--quiet"]  # fmt: skip
    assert cli.main(args) == 0
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["inputs"]["reference_from"] == "statistics"
    assert m["metrics"]["n_reference"] == 3785 and m["metrics"]["n_valid"] == 24
    assert 0 < m["metrics"]["cov_precision"] <= 1 and m["metrics"]["emd_property"] is not None


@pytest.mark.slow
def test_whole_split_evaluation_equals_the_shipped_stats(shipped):
    """The whole test split (3,785 fingerprints, about 4 CPU-minutes uncached)."""
    samples = load_structure_set("perov_5:val", limit=300, progress=False)
    ref = load_structure_set("perov_5:test", progress=False)
    opts = EvalOptions(task="gen", dataset_name="perov_5", property="heat_ref", n_draw=100)
    a = evaluate(samples, ref, opts, progress=False)
    b = evaluate(samples, shipped, opts, progress=False)
    for k, x in a.metrics.items():
        y = b.metrics[k]
        assert (y == pytest.approx(x, abs=1e-9)) if isinstance(x, float) else x == y, k
