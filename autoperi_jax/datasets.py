"""Datasets: CDVAE / DiffCSP CSVs, CIF folders, ASE-readable files; cached periodic graphs.

A dataset is named by a spec:

* ``perov_5``, ``mp_20``, ``carbon_24``, ``mpts_52``, optionally ``NAME:SPLIT`` with split one
  of train / val / test (default train). No benchmark data ships with the package: a split is
  looked for, in this order, in

  1. ``--data-dir`` (``data_dir``) as ``DIR/NAME/SPLIT.csv`` (``.csv.gz`` / ``.csv.xz`` too),
  2. ``$AUTOPERI_DATA`` (same layout),
  3. the cache, ``cache_root() / "datasets" / NAME / SPLIT.csv``,
  4. otherwise it is downloaded once from its public source (`DATASET_FILES`: the CDVAE /
     DiffCSP repositories' raw files at a pinned commit, or ``$AUTOPERI_DATA_MIRROR/NAME/
     SPLIT.csv``), with a progress bar, checked against its published size and SHA-256, and
     stored in the cache (`autoperi_jax.download`). ``$AUTOPERI_OFFLINE=1`` forbids the
     download; offline or on a mismatch the error names the file, where to get it and where
     to put it, and no partial file is left.

  ``mp_20:train_partial`` and ``mpts_52:train_partial`` are parts of those train splits that
  some local copies hold (`LOCAL_SPLITS`); they are found by steps 1-3 only and are never
  taken for the full split.
* a path: a CSV with a ``cif`` column (CDVAE or DiffCSP format; numeric columns become
  properties), a folder of ``*.cif`` files, or any file ASE reads (extxyz, POSCAR, ``.db``).

`load_dataset` parses every structure on all cores (progress bar), validates it, builds its
periodic graph (`autoperi_jax.graph`) and caches the result on disk as a numpy ``.npz``
(never pickle) keyed by the input file's SHA-256 and every setting that changes the output.

To add a benchmark: an entry in `DATASETS` (its property and where it is published) and one
`DatasetFile` per split in `DATASET_FILES`.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import multiprocessing
import os
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autoperi_jax.crystal import Crystal, CrystalError, read_structures
from autoperi_jax.download import DownloadError, fetch, sha256_file
from autoperi_jax.graph import CrystalGraph, GraphSettings, crystal_to_graph

__all__ = [
    "DATASETS",
    "DATASET_FILES",
    "LOCAL_SPLITS",
    "DatasetError",
    "DatasetFile",
    "GraphDataset",
    "Rejection",
    "cache_root",
    "dataset_cache_dir",
    "load_crystals",
    "load_dataset",
    "resolve_dataset",
]

CACHE_VERSION = 1
SPLITS = ("train", "val", "test")

DATASETS: dict[str, dict[str, str]] = {
    "perov_5": {
        "property": "heat_ref",
        "source": "https://github.com/jiaor17/DiffCSP/tree/main/data/perov_5 (also "
        "https://github.com/txie-93/cdvae/tree/main/data/perov_5)",
        "licence": "MIT (CDVAE, DiffCSP); data: Castelli et al. 2012, Energy Environ. Sci. 5, "
        "9034 (Computational Materials Repository)",
    },
    "mp_20": {
        "property": "formation_energy_per_atom",
        "source": "https://github.com/jiaor17/DiffCSP/tree/main/data/mp_20 (DiffCSP format; "
        "CDVAE format: https://github.com/txie-93/cdvae/tree/main/data/mp_20)",
        "licence": "CC BY 4.0 (Materials Project, Jain et al. 2013); split: CDVAE (MIT)",
    },
    "carbon_24": {
        "property": "energy_per_atom",
        "source": "https://github.com/txie-93/cdvae/tree/main/data/carbon_24",
        "licence": "MIT (CDVAE); data: Pickard, AIRSS carbon at 10 GPa, Materials Cloud "
        "doi:10.24435/MATERIALSCLOUD:2020.0026/V1",
    },
    "mpts_52": {
        "property": "formation_energy_per_atom",
        "source": "https://github.com/jiaor17/DiffCSP/tree/main/data/mpts_52 "
        "(Baird & Sparks, figshare doi:10.6084/m9.figshare.19991516.v4)",
        "licence": "CC BY 4.0 (Materials Project); split: Baird & Sparks; DiffCSP (MIT)",
    },
}


@dataclasses.dataclass(frozen=True)
class DatasetFile:
    """One published split: where its CSV lives and what its bytes are.

    Attributes:
      url: raw-file address at a pinned commit.
      sha256: hex digest of the file as published.
      size: bytes.
    """

    url: str
    sha256: str
    size: int


_RAW = "https://raw.githubusercontent.com"
_DIFFCSP = f"{_RAW}/jiaor17/DiffCSP/7121d159826efa2ba9500bf299250d96da37f146/data"
_CDVAE = f"{_RAW}/txie-93/cdvae/f857f598d6f6cca5dc1ea0582d228f12dcc2c2ea/data"

# (name, split) -> published file. Digests and sizes as recorded in the project's data
# provenance notes (DiffCSP / CDVAE at the commits in the addresses).
DATASET_FILES: dict[tuple[str, str], DatasetFile] = {
    ("perov_5", "train"): DatasetFile(
        f"{_DIFFCSP}/perov_5/train.csv",
        "6144a97ead4828a781a1c269c56fedc34b65945977c6433a055a720c47bf77f6",
        21_695_296,
    ),
    ("perov_5", "val"): DatasetFile(
        f"{_DIFFCSP}/perov_5/val.csv",
        "efb9c832756439747f093e03a35daf073fcc9a5fc43a8a5292addee2f3d7ce90",
        7_233_118,
    ),
    ("perov_5", "test"): DatasetFile(
        f"{_DIFFCSP}/perov_5/test.csv",
        "2511340f0e08b25699e9386e100ae0b30cd9b9c8a5b29622c3533644e04c95fa",
        7_229_328,
    ),
    ("mp_20", "train"): DatasetFile(
        f"{_DIFFCSP}/mp_20/train.csv",
        "9c5a34b3684ff4b86d87a86c1c42298d1d28322ea0f03059d9e80ab6a2b729a7",
        80_920_549,
    ),
    ("mp_20", "val"): DatasetFile(
        f"{_DIFFCSP}/mp_20/val.csv",
        "68e101e777c168429d84feb5bf1c5432f1a1b625884f72499c54c4d68e7ee73a",
        26_864_684,
    ),
    ("mp_20", "test"): DatasetFile(
        f"{_DIFFCSP}/mp_20/test.csv",
        "6d63e5d7a607866d94014b3e8ae34f0b9f4d6a2b2332bbc50fd3ec976f487231",
        26_846_148,
    ),
    ("mpts_52", "train"): DatasetFile(
        f"{_DIFFCSP}/mpts_52/train.csv",
        "db33cfc86530bbd4b020405989c5cd12130f447ad7b9258d29b3ff9c8a26d764",
        45_705_353,
    ),
    ("mpts_52", "val"): DatasetFile(
        f"{_DIFFCSP}/mpts_52/val.csv",
        "b5d9f7a8ff72f3a1f24d6bb97e11ad201be40d10be7b27924234da06af04baba",
        9_941_357,
    ),
    ("mpts_52", "test"): DatasetFile(
        f"{_DIFFCSP}/mpts_52/test.csv",
        "4d6e76c4726fb12fb2a7e5bb23594f9b82dbd9bf67b7bfd4866e9c74a8f49038",
        16_358_482,
    ),
    ("carbon_24", "train"): DatasetFile(
        f"{_CDVAE}/carbon_24/train.csv",
        "79b4465695d82b23abb56e9b855ac4841eb991ff3e0952a44b0ca3857e1a304a",
        15_214_751,
    ),
    ("carbon_24", "val"): DatasetFile(
        f"{_CDVAE}/carbon_24/val.csv",
        "36c00689cd63073c954a58bc6ed6e2adb7aeed5a630c994970959a1babffd50e",
        2_321_923,
    ),
    ("carbon_24", "test"): DatasetFile(
        f"{_CDVAE}/carbon_24/test.csv",
        "386b17c08816f434818d51e46687bf72ff3f92348f3ba24823e4758f1fe8a969",
        2_319_350,
    ),
}

# Splits that only local copies hold: found in --data-dir / $AUTOPERI_DATA / the cache,
# never downloaded, never taken for the full split.
LOCAL_SPLITS: dict[tuple[str, str], str] = {
    ("mp_20", "train_partial"): "15,455 of the 27,136 MP-20 train crystals (not a uniform "
    "sample); a model trained on it must say so",
    ("mpts_52", "train_partial"): "12,751 of the 27,380 MPTS-52 train crystals",
}
_SUFFIXES = (".csv", ".csv.gz", ".csv.xz")

# Columns of the CDVAE / DiffCSP CSVs that are identifiers or text, never properties.
_NON_PROPERTY = {"material_id", "cif", "cif.conv", "formula", "pretty_formula", "elements"}


class DatasetError(ValueError):
    """A dataset that cannot be found or read; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Rejection:
    """A row that was not loaded: where it is and why."""

    source: str
    row: int
    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source} row {self.row} ({self.name}): {self.reason}"


# -------------------------------------------------------------------------- resolution
def dataset_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where downloaded splits are kept: ``cache_root() / "datasets"``."""
    return cache_root(environ) / "datasets"


def _offline() -> bool:
    return os.environ.get("AUTOPERI_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def _find_local(name: str, split: str, roots: Sequence[Path], tried: list[str]) -> Path | None:
    for root in roots:
        for suffix in _SUFFIXES:
            p = root / name / f"{split}{suffix}"
            tried.append(str(p))
            if p.is_file():
                return p
    return None


def _remote(name: str, split: str) -> DatasetFile:
    f = DATASET_FILES[(name, split)]
    mirror = os.environ.get("AUTOPERI_DATA_MIRROR")
    if mirror:
        return dataclasses.replace(f, url=f"{mirror.rstrip('/')}/{name}/{split}.csv")
    return f


def _resolve_named(
    name: str, split: str, data_dir: str | os.PathLike | None, download: bool | None
) -> Path:
    """Steps 1-4 of the module docstring for ``NAME:SPLIT``."""
    known = [s for n, s in (*DATASET_FILES, *LOCAL_SPLITS) if n == name]
    if split not in known:
        raise DatasetError(f"unknown split {split!r} of {name!r}; use one of {known}")
    roots = [Path(p).expanduser() for p in (data_dir, os.environ.get("AUTOPERI_DATA")) if p]
    roots.append(dataset_cache_dir())
    tried: list[str] = []
    found = _find_local(name, split, roots, tried)
    if found is not None:
        return found
    where = f"DIR/{name}/{split}.csv (with --data-dir DIR or AUTOPERI_DATA=DIR)"
    if (name, split) in LOCAL_SPLITS:
        raise DatasetError(
            f"{name}:{split} ({LOCAL_SPLITS[name, split]}) is not published and so cannot "
            f"be downloaded; looked for {', '.join(tried)}. Put the file at {where}."
        )
    remote = _remote(name, split)
    dest = dataset_cache_dir() / name / f"{split}.csv"
    expected = (
        f"the file expected is {name}/{split}.csv ({remote.size:,} bytes, sha256 "
        f"{remote.sha256}) from {remote.url} (published at {DATASETS[name]['source']})"
    )
    if download is False or (download is None and _offline()):
        why = "downloads are off (AUTOPERI_OFFLINE)" if download is None else "no download"
        raise DatasetError(
            f"dataset {name} split {split} not found locally (looked for {', '.join(tried)}) "
            f"and {why}; {expected}. Download it and put it at {dest} or {where}."
        )
    try:
        return fetch(remote.url, dest, remote.sha256, remote.size, desc=f"{name}/{split}.csv")
    except DownloadError as e:
        raise DatasetError(
            f"dataset {name} split {split} not found locally (looked for {', '.join(tried)}) "
            f"and the download failed: {e}; {expected}. Download it yourself and put it at "
            f"{dest} or {where}."
        ) from e


def resolve_dataset(
    spec: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    download: bool | None = None,
) -> Path:
    """Finds the file or folder behind a dataset spec (see module docstring).

    Args:
      spec: ``NAME[:SPLIT]``, a path, or ``FOLDER:SPLIT`` for a user's folder of splits.
      data_dir: folder holding ``NAME/SPLIT.csv`` (looked in first).
      download: whether a named split missing locally may be downloaded; ``None`` = yes
        unless ``$AUTOPERI_OFFLINE`` is set.

    Raises:
      DatasetError: naming the places searched, the file expected and where to put it.
    """
    spec = str(spec)
    name, _, split = spec.partition(":")
    if name in DATASETS:
        return _resolve_named(name, split or "train", data_dir, download)
    path = Path(spec)
    if split and split in SPLITS and not path.exists() and Path(name).is_dir():
        # A user's dataset folder with one entry per split: SPLIT.csv[.gz|.xz],
        # SPLIT.extxyz or a SPLIT/ folder of CIFs.
        root = Path(name)
        tried = [root / f"{split}{suf}" for suf in (".csv", ".csv.gz", ".csv.xz", ".extxyz")]
        tried.append(root / split)
        for p in tried:
            if p.exists():
                return p
        if any(root.glob("*.cif")):
            return root  # one CIF folder: the same structures for every split
        raise DatasetError(
            f"{name}: no {split} split (looked for {', '.join(str(t) for t in tried)}); "
            f"put one file per split (train.csv, val.csv, test.csv with a 'cif' column, or "
            f".extxyz, or train/ val/ test/ folders of CIFs) in {name}"
        )
    if not path.exists():
        raise DatasetError(
            f"{spec!r} is neither a named dataset ({', '.join(DATASETS)}) nor an existing "
            "file or folder"
        )
    return path


def _file_digest(path: Path) -> str:
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(path.glob("*.cif")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------------ parsing rows
@dataclasses.dataclass(frozen=True)
class _Options:
    settings: GraphSettings
    property_names: tuple[str, ...]
    standardize: str | None
    max_atoms: int | None
    min_distance: float


def _standardize(c: Crystal, how: str | None) -> Crystal:
    if how is None:
        return c
    if how == "niggli":  # CDVAE's preprocessing: Niggli cell in canonical orientation
        return c.niggli().canonical_orientation()
    if how == "conventional":
        return c.standardize(to_primitive=False)
    if how == "primitive":
        return c.standardize(to_primitive=True)
    raise ValueError(f"standardize must be None, 'niggli', 'conventional' or 'primitive': {how!r}")


def _process(crystal: Crystal, opts: _Options) -> tuple[Crystal, CrystalGraph]:
    crystal = _standardize(crystal, opts.standardize)
    crystal.validate(min_distance=opts.min_distance, max_atoms=opts.max_atoms)
    return crystal, crystal_to_graph(crystal, opts.settings, opts.property_names)


def _process_rows(rows: list[tuple[int, str, str, dict]], opts: _Options) -> list[Any]:
    """Worker: CIF text rows -> graphs, or the reason a row was rejected."""
    out: list[Any] = []
    for row, name, cif, props in rows:
        try:
            crystal = Crystal.from_cif(cif, name=name, properties=props)
            out.append(_process(crystal, opts)[1])
        except CrystalError as e:
            out.append((row, name, str(e)))
    return out


# --------------------------------------------------------------------- graph datasets
@dataclasses.dataclass
class GraphDataset:
    """Preprocessed crystals of one file as periodic graphs (flat numpy arrays).

    Attributes:
      graphs: one `CrystalGraph` per loaded structure.
      ids: [n] names (material_id or file name).
      property_names: names of the columns of every graph's ``properties``.
      source: the file or folder it came from.
      rejected: rows that were skipped and why (``on_error='skip'``).
      settings: the graph settings used.
    """

    graphs: list[CrystalGraph]
    ids: list[str]
    property_names: tuple[str, ...]
    source: str
    rejected: list[Rejection]
    settings: GraphSettings

    def __len__(self) -> int:
        return len(self.graphs)

    def crystal(self, i: int) -> Crystal:
        g = self.graphs[i]
        props = {k: float(v) for k, v in zip(self.property_names, g.properties) if np.isfinite(v)}
        return Crystal(g.cell, g.frac_coords, g.numbers, props, name=self.ids[i])

    def crystals(self) -> list[Crystal]:
        return [self.crystal(i) for i in range(len(self))]

    @property
    def n_node(self) -> np.ndarray:
        return np.array([len(g.numbers) for g in self.graphs])

    @property
    def n_edge(self) -> np.ndarray:
        return np.array([len(g.senders) for g in self.graphs])

    def property_array(self, name: str) -> np.ndarray:
        """[n] values of one property (NaN where missing)."""
        if name not in self.property_names:
            raise DatasetError(
                f"{self.source}: no property {name!r}; available: {list(self.property_names)}"
            )
        k = self.property_names.index(name)
        return np.array([g.properties[k] for g in self.graphs])

    # ---------------------------------------------------------------- npz cache
    def save(self, path: Path) -> None:
        """Writes the dataset as one compressed ``.npz`` (atomic rename; no pickle)."""
        gs = self.graphs
        arrays = {
            "n_node": self.n_node,
            "n_edge": self.n_edge,
            "numbers": _cat([g.numbers for g in gs], np.int16, 0),
            "frac_coords": _cat([g.frac_coords for g in gs], np.float64, (0, 3)),
            "cell": _cat([g.cell[None] for g in gs], np.float64, (0, 3, 3)),
            "senders": _cat([g.senders for g in gs], np.int32, 0),
            "receivers": _cat([g.receivers for g in gs], np.int32, 0),
            "shifts": _cat([g.shifts for g in gs], np.int8, (0, 3)),
            "properties": _cat(
                [g.properties[None] for g in gs], np.float64, (0, len(self.property_names))
            ),
            "ids": np.array(self.ids, dtype=str),
            "meta": np.array(
                json.dumps(
                    {
                        "property_names": list(self.property_names),
                        "source": self.source,
                        "rejected": [dataclasses.asdict(r) for r in self.rejected],
                        "settings": dataclasses.asdict(self.settings),
                    }
                )
            ),
        }
        if len(gs) and np.abs(np.concatenate([g.shifts for g in gs])).max() > 127:
            arrays["shifts"] = arrays["shifts"].astype(np.int32)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> GraphDataset:
        with np.load(path, allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
        meta = json.loads(str(a["meta"]))
        node_off = np.concatenate([[0], np.cumsum(a["n_node"])])
        edge_off = np.concatenate([[0], np.cumsum(a["n_edge"])])
        numbers = a["numbers"].astype(np.int64)
        senders, receivers = a["senders"].astype(np.int64), a["receivers"].astype(np.int64)
        shifts = a["shifts"].astype(np.int64)
        graphs = [
            CrystalGraph(
                numbers=numbers[node_off[i] : node_off[i + 1]],
                frac_coords=a["frac_coords"][node_off[i] : node_off[i + 1]],
                cell=a["cell"][i],
                senders=senders[edge_off[i] : edge_off[i + 1]],
                receivers=receivers[edge_off[i] : edge_off[i + 1]],
                shifts=shifts[edge_off[i] : edge_off[i + 1]],
                properties=a["properties"][i],
            )
            for i in range(len(a["n_node"]))
        ]
        return cls(
            graphs=graphs,
            ids=a["ids"].tolist(),
            property_names=tuple(meta["property_names"]),
            source=meta["source"],
            rejected=[Rejection(**r) for r in meta["rejected"]],
            settings=GraphSettings(**meta["settings"]),
        )


def _cat(arrays: list[np.ndarray], dtype, empty_shape) -> np.ndarray:
    if not arrays:
        return np.zeros(empty_shape, dtype)
    return np.concatenate(arrays).astype(dtype)


# ------------------------------------------------------------------------- CSV reading
def _read_csv_rows(
    path: Path, cif_column: str, properties: Sequence[str] | None
) -> tuple[list[tuple[int, str, str, dict]], tuple[str, ...]]:
    import pandas as pd

    if path.stat().st_size == 0:
        raise DatasetError(f"{path}: file is empty")
    try:
        df = pd.read_csv(path)
    except Exception as e:
        raise DatasetError(f"{path}: cannot read as CSV ({type(e).__name__}: {e})") from e
    if len(df) == 0:
        raise DatasetError(f"{path}: CSV has a header but no rows")
    if cif_column not in df.columns:
        raise DatasetError(
            f"{path}: no {cif_column!r} column (columns: {list(df.columns)}); a structure CSV "
            "needs CIF text in a 'cif' column (CDVAE / DiffCSP format)"
        )
    numeric = [
        c
        for c in df.columns
        if c not in _NON_PROPERTY and not c.startswith("Unnamed") and c != cif_column
        if pd.api.types.is_numeric_dtype(df[c])
    ]
    if properties is None:
        names = tuple(numeric)
    else:
        missing = [p for p in properties if p not in df.columns]
        if missing:
            raise DatasetError(
                f"{path}: property column(s) {missing} not found; numeric columns are {numeric}"
            )
        bad = [p for p in properties if p not in numeric]
        if bad:
            raise DatasetError(f"{path}: property column(s) {bad} are not numeric")
        names = tuple(properties)
    ids = df["material_id"].astype(str) if "material_id" in df.columns else None
    values = df[list(names)].to_numpy(np.float64) if names else np.zeros((len(df), 0))
    cifs = df[cif_column]
    rows = []
    for r in range(len(df)):
        name = ids.iloc[r] if ids is not None else f"row{r}"
        cif = cifs.iloc[r]
        props = {k: v for k, v in zip(names, values[r]) if np.isfinite(v)}
        rows.append((r, name, cif if isinstance(cif, str) else "", props))
    return rows, names


def _iter_chunks(items: list, size: int):
    for s in range(0, len(items), size):
        yield items[s : s + size]


def _build_from_rows(
    rows: list[tuple[int, str, str, dict]],
    opts: _Options,
    source: str,
    on_error: str,
    workers: int | None,
    progress: bool,
) -> tuple[list[CrystalGraph], list[str], list[Rejection]]:
    from tqdm.auto import tqdm

    workers = workers or os.cpu_count() or 1
    chunk = 64
    chunks = list(_iter_chunks(rows, chunk))
    bar = tqdm(
        total=len(rows), desc=f"preprocessing {Path(source).name}", unit="cif", disable=not progress
    )
    results: list[list[Any]] = [None] * len(chunks)  # type: ignore[list-item]
    if workers > 1 and len(rows) > 4 * chunk:
        # Never fork a process that may already hold JAX / thread pools: forkserver (Linux)
        # starts workers from a clean server process; spawn elsewhere.
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        try:
            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
                futures = {ex.submit(_process_rows, c, opts): k for k, c in enumerate(chunks)}
                for fut in cf.as_completed(futures):
                    k = futures[fut]
                    results[k] = fut.result()
                    bar.update(len(chunks[k]))
        except cf.process.BrokenProcessPool:
            # Workers cannot start when __main__ is not importable (code piped to stdin).
            warnings.warn(
                "worker processes failed to start; preprocessing on one core", stacklevel=3
            )
    for k, c in enumerate(chunks):
        if results[k] is None:
            results[k] = _process_rows(c, opts)
            bar.update(len(c))
    bar.close()
    graphs, ids, rejected = [], [], []
    for c, res in zip(chunks, results):
        for (_, name, _, _), r in zip(c, res):
            if isinstance(r, CrystalGraph):
                graphs.append(r)
                ids.append(name)
            else:
                rej = Rejection(source, r[0], r[1], r[2])
                if on_error == "raise":
                    raise DatasetError(
                        f"{rej}. Fix or remove the row, or pass on_error='skip' "
                        "(--skip-bad-rows) to skip bad rows and report them."
                    )
                rejected.append(rej)
    return graphs, ids, rejected


def _rows_from_structures(
    path: Path,
) -> list[tuple[int, str, Crystal | str]]:
    """(row, name, Crystal or error) for a CIF folder or an ASE-readable file."""
    out: list[tuple[int, str, Crystal | str]] = []
    if path.is_dir():
        files = sorted(path.glob("*.cif"))
        if not files:
            raise DatasetError(f"{path}: folder holds no *.cif files")
        for r, f in enumerate(files):
            try:
                out.append((r, f.name, Crystal.from_cif(f, name=f.name)))
            except CrystalError as e:
                out.append((r, f.name, str(e)))
        return out
    try:
        crystals = read_structures(path)
    except CrystalError as e:
        raise DatasetError(str(e)) from e
    return [(r, c.name, c) for r, c in enumerate(crystals)]


# ------------------------------------------------------------------------- public API
def cache_root(environ: Mapping[str, str] | None = None) -> Path:
    """The folder of autoperi's on-disk caches (graphs here, fingerprints in `eval`, compiled
    programs in `autoperi_jax.cli`): ``$AUTOPERI_CACHE``, else ``~/.cache/autoperi_jax``.
    ``environ``: the variables to read (default ``os.environ``)."""
    env = os.environ if environ is None else environ
    return Path(env.get("AUTOPERI_CACHE") or Path.home() / ".cache" / "autoperi_jax")


def load_dataset(
    spec: str | os.PathLike,
    split: str | None = None,
    settings: GraphSettings | None = None,
    properties: Sequence[str] | None = None,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    on_error: str = "raise",
    standardize: str | None = None,
    max_atoms: int | None = None,
    min_distance: float = 0.5,
    cif_column: str = "cif",
    workers: int | None = None,
    progress: bool = True,
    use_cache: bool = True,
) -> GraphDataset:
    """Loads a dataset as periodic graphs, from the on-disk cache when it can.

    Args:
      spec: dataset name (``perov_5``, ``mp_20:val``, ...) or a path (module docstring).
      split: overrides the split in ``spec`` for named datasets.
      settings: graph settings (cutoff, neighbour cap).
      properties: property columns to keep (default: every numeric column); a missing one
        is an error.
      data_dir: where named datasets live (else ``$AUTOPERI_DATA``).
      cache_dir: cache folder (else ``$AUTOPERI_CACHE``, else ``~/.cache/autoperi_jax``).
      on_error: ``'raise'`` at the first bad row (message names file, row, material_id) or
        ``'skip'`` bad rows and list them in ``rejected``.
      standardize: ``None``, ``'niggli'`` (CDVAE's), ``'conventional'`` or ``'primitive'``
        (spglib).
      max_atoms: atom budget; larger structures are rejected.
      min_distance: structures with two atoms closer than this (A) are rejected.
      cif_column: CSV column holding CIF text.
      workers: processes used for parsing (default: every core).
      progress: show a progress bar.
      use_cache: read and write the cache.

    Returns:
      `GraphDataset`.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    settings = settings or GraphSettings()
    spec = str(spec)
    if split is not None and ":" not in spec and (spec in DATASETS or Path(spec).is_dir()):
        spec = f"{spec}:{split}"
    path = resolve_dataset(spec, data_dir)
    opts = _Options(
        settings,
        tuple(properties) if properties is not None else (),
        standardize,
        max_atoms,
        min_distance,
    )
    key = json.dumps(
        {
            "v": CACHE_VERSION,
            "digest": _file_digest(path),
            "settings": dataclasses.asdict(settings),
            "properties": list(properties) if properties is not None else None,
            "standardize": standardize,
            "max_atoms": max_atoms,
            "min_distance": min_distance,
            "on_error": on_error,
            "cif_column": cif_column,
        },
        sort_keys=True,
    )
    folder = Path(cache_dir) if cache_dir else cache_root()
    # Named by content and settings only, so a copy of the same file elsewhere hits too.
    cache_file = folder / f"graphs-{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"
    if use_cache and cache_file.exists():
        try:
            cached = GraphDataset.load(cache_file)
            # the same bytes may have been cached from another location
            cached.source = str(path)
            return cached
        except Exception as e:  # a damaged cache is rebuilt, never trusted
            warnings.warn(f"ignoring unreadable cache {cache_file}: {e}", stacklevel=2)

    is_csv = path.is_file() and ".csv" in path.name
    if is_csv:
        rows, names = _read_csv_rows(path, cif_column, properties)
        opts = dataclasses.replace(opts, property_names=names)
        graphs, ids, rejected = _build_from_rows(rows, opts, str(path), on_error, workers, progress)
    else:
        graphs, ids, rejected, names = _load_structures(path, properties, opts, on_error)
    if not graphs:
        raise DatasetError(
            f"{path}: no structure could be loaded"
            + (f" ({len(rejected)} rejected, first: {rejected[0]})" if rejected else "")
        )
    ds = GraphDataset(graphs, ids, names, str(path), rejected, settings)
    if use_cache:
        ds.save(cache_file)
    return ds


def _load_structures(path: Path, properties, opts: _Options, on_error: str):
    entries = _rows_from_structures(path)
    crystals = [e for e in entries if isinstance(e[2], Crystal)]
    all_props = sorted({k for _, _, c in crystals for k in c.properties})  # type: ignore[union-attr]
    if properties is not None:
        missing = [p for p in properties if p not in all_props]
        if missing:
            raise DatasetError(
                f"{path}: property {missing} not found in any structure; available: {all_props}"
            )
        names = tuple(properties)
    else:
        names = tuple(all_props)
    opts = dataclasses.replace(opts, property_names=names)
    graphs, ids, rejected = [], [], []
    for row, name, c in entries:
        try:
            if isinstance(c, str):
                raise CrystalError(c)
            graphs.append(_process(c, opts)[1])
            ids.append(name)
        except CrystalError as e:
            rej = Rejection(str(path), row, name, str(e))
            if on_error == "raise":
                raise DatasetError(
                    f"{rej}. Fix or remove it, or pass on_error='skip' (--skip-bad-rows)."
                ) from e
            rejected.append(rej)
    return graphs, ids, rejected, names


def load_crystals(spec: str | os.PathLike, **kwargs: Any) -> list[Crystal]:
    """Loads a dataset (any spec `load_dataset` accepts) as `Crystal` objects."""
    return load_dataset(spec, **kwargs).crystals()


def summarize(ds: GraphDataset, elapsed_s: float | None = None) -> str:
    """Human-readable summary: counts, atoms-per-cell histogram, elements, properties,
    graph sizes and rejected rows."""
    from ase.data import chemical_symbols

    lines = [f"source: {ds.source}", f"structures: {len(ds)}"]
    if elapsed_s is not None:
        lines.append(f"load time: {elapsed_s:.2f} s")
    lines.append(f"graph: cutoff {ds.settings.cutoff} A, max_neighbors {ds.settings.max_neighbors}")
    n_node = ds.n_node
    lines.append("atoms per cell:")
    counts = Counter(n_node.tolist())
    top = max(counts.values())
    for n in sorted(counts):
        bar = "#" * max(1, round(40 * counts[n] / top))
        lines.append(f"  {n:4d} | {bar} {counts[n]}")
    elements = Counter(int(z) for g in ds.graphs for z in set(g.numbers.tolist()))
    lines.append(
        f"elements ({len(elements)}): "
        + ", ".join(f"{chemical_symbols[z]}:{c}" for z, c in elements.most_common())
    )
    n_edge = ds.n_edge
    lines.append(
        f"edges per graph: mean {n_edge.mean():.1f}, min {n_edge.min()}, max {n_edge.max()}"
    )
    if ds.property_names:
        lines.append("properties:")
        for name in ds.property_names:
            v = ds.property_array(name)
            ok = np.isfinite(v)
            if ok.any():
                lines.append(
                    f"  {name:24s} n={ok.sum():6d} mean={v[ok].mean():10.4f} "
                    f"std={v[ok].std():9.4f} min={v[ok].min():10.4f} max={v[ok].max():10.4f}"
                )
    lines.append(f"rejected rows: {len(ds.rejected)}")
    reasons = Counter(r.reason.split(": ", 1)[-1].split(" (")[0] for r in ds.rejected)
    for reason, c in reasons.most_common(10):
        lines.append(f"  {c:6d} x {reason}")
    return "\n".join(lines)


def timed_load(*args: Any, **kwargs: Any) -> tuple[GraphDataset, float]:
    """`load_dataset` and its wall time in seconds."""
    t = time.perf_counter()
    ds = load_dataset(*args, **kwargs)
    return ds, time.perf_counter() - t
