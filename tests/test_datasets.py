"""Dataset loading: CSV formats, CIF folders, ASE files, the cache, and bad input."""

from __future__ import annotations

import os

import ase.db
import ase.io
import numpy as np
import pandas as pd
import pytest
from ase.build import bulk

from autoperi_jax import cli
from autoperi_jax.crystal import Crystal
from autoperi_jax.datasets import (
    DatasetError,
    GraphDataset,
    load_dataset,
    resolve_dataset,
    summarize,
)
from autoperi_jax.graph import GraphSettings

PEROV_TEST = "perov_5:test"


@pytest.fixture(scope="module")
def perov_rows():
    path = resolve_dataset(PEROV_TEST)
    return pd.read_csv(path, nrows=40)


def _write(df: pd.DataFrame, path) -> str:
    df.to_csv(path, index=False)
    return str(path)


def test_diffcsp_csv_keeps_numeric_properties(perov_rows, tmp_path):
    ds = load_dataset(_write(perov_rows, tmp_path / "diffcsp.csv"), progress=False)
    assert len(ds) == 40
    assert ds.property_names == (
        "heat_all", "heat_ref", "dir_gap", "ind_gap", "spacegroup.number", "spacegroup.number.conv"
    )  # fmt: skip
    np.testing.assert_allclose(ds.property_array("heat_ref"), perov_rows["heat_ref"])
    assert ds.ids == perov_rows["material_id"].astype(str).tolist()


def test_cdvae_csv_format_and_selected_properties(perov_rows, tmp_path):
    cdvae = pd.DataFrame(
        {
            "material_id": [f"mp-{i}" for i in range(len(perov_rows))],
            "cif": perov_rows["cif"],
            "formation_energy_per_atom": np.linspace(-1, 0, len(perov_rows)),
            "band_gap": 1.0,
            "pretty_formula": "X",
            "elements": "['A']",
        }
    )
    ds = load_dataset(
        _write(cdvae, tmp_path / "cdvae.csv"), properties=["band_gap"], progress=False
    )
    assert ds.property_names == ("band_gap",)
    assert ds.ids[3] == "mp-3"
    with pytest.raises(DatasetError, match=r"\['e_above_hull'\] not found"):
        load_dataset(str(tmp_path / "cdvae.csv"), properties=["e_above_hull"], progress=False)


def test_malformed_cif_names_file_row_and_id_and_can_be_skipped(perov_rows, tmp_path):
    df = perov_rows.copy()
    df.loc[7, "cif"] = "data_broken\n_cell_length_a 4.0\n"
    df.loc[11, "cif"] = df.loc[11, "cif"].replace("_cell_length_b", "_cell_length_b 0.0 #")
    path = _write(df, tmp_path / "bad.csv")
    bad_id = str(df.loc[7, "material_id"])
    with pytest.raises(DatasetError, match=rf"bad\.csv row 7 \({bad_id}\): .*malformed CIF"):
        load_dataset(path, progress=False)
    ds = load_dataset(path, on_error="skip", progress=False)
    assert len(ds) == 38 and [r.row for r in ds.rejected] == [7, 11]
    assert "rejected rows: 2" in summarize(ds)


def test_large_csv_uses_worker_processes(tmp_path):
    df = pd.read_csv(resolve_dataset(PEROV_TEST), nrows=600)
    df.loc[599, "cif"] = "nonsense"
    ds = load_dataset(_write(df, tmp_path / "big.csv"), on_error="skip", workers=2, progress=False)
    assert len(ds) == 599 and ds.rejected[0].row == 599
    assert ds.ids == df["material_id"].astype(str).tolist()[:599]  # order kept


def test_overlapping_atoms_and_atom_budget_are_rejected(perov_rows, tmp_path):
    close = Crystal(np.eye(3) * 4, [[0, 0, 0], [0.075, 0, 0]], [8, 8]).to_cif()
    df = perov_rows.iloc[:3].copy()
    df.loc[1, "cif"] = close
    path = _write(df, tmp_path / "close.csv")
    with pytest.raises(DatasetError, match=r"row 1 .*0\.300 A apart"):
        load_dataset(path, progress=False)
    with pytest.raises(DatasetError, match="more than the budget max_atoms=4"):
        load_dataset(path, max_atoms=4, progress=False, min_distance=0.0)


def test_empty_and_cifless_files(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DatasetError, match="empty.csv: file is empty"):
        load_dataset(str(empty), progress=False)
    header = tmp_path / "header.csv"
    header.write_text("material_id,cif\n")
    with pytest.raises(DatasetError, match="no rows"):
        load_dataset(str(header), progress=False)
    nocif = tmp_path / "nocif.csv"
    nocif.write_text("a,b\n1,2\n")
    with pytest.raises(DatasetError, match="no 'cif' column"):
        load_dataset(str(nocif), progress=False)


def test_missing_named_dataset_says_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("AUTOPERI_DATA", raising=False)
    with pytest.raises(DatasetError, match=r"DiffCSP.*--data-dir DIR or AUTOPERI_DATA=DIR"):
        resolve_dataset("mp_20:val", data_dir=tmp_path)
    (tmp_path / "mp_20").mkdir()
    (tmp_path / "mp_20" / "val.csv").write_text("x")
    assert resolve_dataset("mp_20:val", data_dir=tmp_path) == tmp_path / "mp_20" / "val.csv"
    monkeypatch.setenv("AUTOPERI_DATA", str(tmp_path))
    assert resolve_dataset("mp_20:val").name == "val.csv"
    with pytest.raises(DatasetError, match="unknown split"):
        resolve_dataset("mp_20:dev")
    with pytest.raises(DatasetError, match="neither a named dataset"):
        resolve_dataset("no/such/file.csv")


def test_cif_folder_extxyz_poscar_and_ase_db(perov_test, tmp_path):
    crystals = [perov_test.crystal(i) for i in range(4)]
    folder = tmp_path / "cifs"
    folder.mkdir()
    for k, c in enumerate(crystals):
        c.to_cif(folder / f"s{k}.cif")
    (folder / "zz_broken.cif").write_text("data_x\n")
    ds = load_dataset(str(folder), on_error="skip", progress=False)
    assert len(ds) == 4 and ds.rejected[0].name == "zz_broken.cif"

    xyz = tmp_path / "s.extxyz"
    ase.io.write(xyz, [c.to_ase() for c in crystals])
    ds = load_dataset(str(xyz), properties=["heat_ref"], progress=False)
    np.testing.assert_allclose(
        ds.property_array("heat_ref"), [c.properties["heat_ref"] for c in crystals]
    )
    np.testing.assert_allclose(ds.graphs[2].cell, crystals[2].cell, atol=1e-8)

    poscar = tmp_path / "POSCAR"
    ase.io.write(poscar, bulk("Si", "diamond", a=5.43), format="vasp")
    ds = load_dataset(str(poscar), progress=False)
    assert len(ds) == 1 and ds.graphs[0].numbers.tolist() == [14, 14]

    db_path = tmp_path / "s.db"
    with ase.db.connect(db_path) as db:
        db.write(bulk("Cu", "fcc", a=3.6), energy_per_atom=-3.5)
        db.write(bulk("Al", "fcc", a=4.05), energy_per_atom=-3.7)
    ds = load_dataset(str(db_path), progress=False)
    assert len(ds) == 2
    np.testing.assert_allclose(ds.property_array("energy_per_atom"), [-3.5, -3.7])

    mol = tmp_path / "mol.extxyz"
    from ase import Atoms

    ase.io.write(mol, Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]]))
    with pytest.raises(DatasetError, match="not periodic"):
        load_dataset(str(mol), progress=False)


def test_cache_hit_key_and_corruption(perov_rows, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    path = _write(perov_rows, tmp_path / "c.csv")
    a = load_dataset(path, cache_dir=cache, progress=False)
    files = list(cache.glob("*.npz"))
    assert len(files) == 1
    b = load_dataset(path, cache_dir=cache, progress=False)
    for ga, gb in zip(a.graphs, b.graphs):
        for x, y in zip(ga, gb):
            np.testing.assert_array_equal(x, y)
    assert a.ids == b.ids and a.property_names == b.property_names
    # same bytes elsewhere: a cache hit that reports where the data was read this time
    moved = tmp_path / "moved.csv"
    moved.write_bytes((tmp_path / "c.csv").read_bytes())
    assert load_dataset(str(moved), cache_dir=cache, progress=False).source == str(moved)
    assert len(list(cache.glob("*.npz"))) == 1
    # another setting -> another entry
    load_dataset(path, cache_dir=cache, settings=GraphSettings(cutoff=4.0), progress=False)
    assert len(list(cache.glob("*.npz"))) == 2
    # changed file -> another entry
    _write(perov_rows.iloc[:10], tmp_path / "c.csv")
    assert len(load_dataset(path, cache_dir=cache, progress=False)) == 10
    # corrupted entry -> warning, rebuilt
    files[0].write_bytes(b"not an npz")
    _write(perov_rows, tmp_path / "c.csv")
    with pytest.warns(UserWarning, match="ignoring unreadable cache"):
        c = load_dataset(path, cache_dir=cache, progress=False)
    assert len(c) == 40
    assert isinstance(GraphDataset.load(files[0]), GraphDataset)


def test_cache_files_load_without_pickle(perov_rows, tmp_path):
    cache = tmp_path / "cache"
    load_dataset(_write(perov_rows, tmp_path / "p.csv"), cache_dir=cache, progress=False)
    (f,) = cache.glob("*.npz")
    with np.load(f, allow_pickle=False) as z:
        assert {"numbers", "senders", "shifts", "cell", "meta"} <= set(z.files)


def test_standardize_options(perov_rows, tmp_path):
    path = _write(perov_rows.iloc[:5], tmp_path / "s.csv")
    for how in ("niggli", "conventional", "primitive"):
        ds = load_dataset(path, standardize=how, progress=False)
        assert len(ds) == 5
    ds = load_dataset(path, standardize="niggli", progress=False)
    cell = ds.graphs[0].cell
    assert abs(cell[0, 1]) < 1e-9 and abs(cell[0, 2]) < 1e-9 and abs(cell[1, 2]) < 1e-9


def test_cli_data_info(capsys, tmp_path, perov_rows):
    path = _write(perov_rows, tmp_path / "i.csv")
    assert cli.main(["data", "info", path, "--cache-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "structures: 40" in out and "heat_ref" in out and "5 | " in out
    assert cli.main(["data", "info", "mp_20", "--data-dir", str(tmp_path)]) == 2
    assert "AUTOPERI_DATA" in capsys.readouterr().err
    assert os.path.exists(path)


def test_user_folder_with_one_file_per_split(perov_rows, tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    _write(perov_rows.iloc[:30], root / "train.csv")
    _write(perov_rows.iloc[30:], root / "val.csv")
    assert len(load_dataset(root, split="train", progress=False)) == 30
    val = load_dataset(f"{root}:val", progress=False)
    assert val.ids == perov_rows["material_id"].astype(str).tolist()[30:]
    with pytest.raises(DatasetError, match=r"no test split .*test\.csv"):
        load_dataset(root, split="test", progress=False)
