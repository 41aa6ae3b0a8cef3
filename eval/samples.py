"""Reading generated samples and reference sets for evaluation, without dropping anything.

`autoperi_jax.datasets.load_dataset` rejects structures with overlapping atoms, which is
right for training data and wrong for evaluation: an invalid sample must be counted as
invalid, not silently removed. `load_structure_set` therefore keeps every entry, in file
order; an entry that cannot be parsed (or has a degenerate cell) becomes ``None`` with the
reason, and counts as invalid in every metric.

Accepted inputs: a named dataset split (``perov_5:test``, resolved like the rest of the
package with ``--data-dir`` / ``$AUTOPERI_DATA``), a CSV (``.csv``, ``.csv.gz``, ``.csv.xz``)
with a ``cif`` column (CDVAE / DiffCSP format; ``material_id`` names the rows, numeric
columns become properties), a folder of ``*.cif`` files, or any file ASE reads (extxyz,
POSCAR, ...; scalar ``atoms.info`` entries become properties, ``info['name']`` the name).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import numpy as np

from autoperi_jax.crystal import Crystal, CrystalError
from autoperi_jax.parallel import parallel_map

__all__ = ["StructureSet", "load_structure_set"]

_ID_COLUMNS = {"material_id", "cif", "cif.conv", "formula", "pretty_formula", "elements"}


@dataclasses.dataclass
class StructureSet:
    """Structures in file order.

    Attributes:
      crystals: [n] `Crystal` or ``None`` where the entry could not be read.
      names: [n] identifiers (material_id, file name, ``info['name']``, or ``FILE[i]``).
      errors: [n] why an entry is ``None`` (else ``None``).
      source: the resolved path.
    """

    crystals: list[Crystal | None]
    names: list[str]
    errors: list[str | None]
    source: str

    def __len__(self) -> int:
        return len(self.crystals)

    def property_values(self, name: str) -> np.ndarray:
        """[n] values of a property (NaN where missing)."""
        return np.array(
            [np.nan if c is None else float(c.properties.get(name, np.nan)) for c in self.crystals]
        )

    def has_property(self, name: str) -> bool:
        return any(c is not None and name in c.properties for c in self.crystals)

    def head(self, n: int | None) -> StructureSet:
        if n is None or n >= len(self):
            return self
        return StructureSet(self.crystals[:n], self.names[:n], self.errors[:n], self.source)

    @property
    def n_unreadable(self) -> int:
        return sum(c is None for c in self.crystals)


def _parse_cif_chunk(rows: list[tuple[str, str, dict]]) -> list[tuple[Crystal | None, str | None]]:
    out: list[tuple[Crystal | None, str | None]] = []
    for name, cif, props in rows:
        try:
            out.append((Crystal.from_cif(cif, name=name, properties=props), None))
        except (CrystalError, ValueError) as e:
            out.append((None, str(e)))
    return out


def _read_csv(path: Path, workers: int | None, progress: bool, limit: int | None) -> StructureSet:
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except Exception as e:
        raise CrystalError(f"{path}: cannot read as CSV ({type(e).__name__}: {e})") from e
    if "cif" not in df.columns:
        raise CrystalError(f"{path}: no 'cif' column (columns: {list(df.columns)})")
    if limit is not None:
        df = df.iloc[:limit]
    numeric = [
        c
        for c in df.columns
        if c not in _ID_COLUMNS
        and not str(c).startswith("Unnamed")
        and pd.api.types.is_numeric_dtype(df[c])
    ]
    names = (
        df["material_id"].astype(str).tolist()
        if "material_id" in df.columns
        else [f"{path.name}[{i}]" for i in range(len(df))]
    )
    values = df[numeric].to_numpy(np.float64) if numeric else np.zeros((len(df), 0))
    rows = []
    for i, cif in enumerate(df["cif"].tolist()):
        props = {k: float(v) for k, v in zip(numeric, values[i]) if np.isfinite(v)}
        rows.append((names[i], cif if isinstance(cif, str) else "", props))
    parsed = parallel_map(
        _parse_cif_chunk, rows, workers=workers, chunk_size=256, desc=f"reading {path.name}",
        progress=progress, unit="cif",
    )  # fmt: skip
    return StructureSet([p[0] for p in parsed], names, [p[1] for p in parsed], str(path))


def _read_cif_folder(path: Path) -> StructureSet:
    files = sorted(path.glob("*.cif"))
    if not files:
        raise CrystalError(f"{path}: folder holds no *.cif files")
    crystals, names, errors = [], [], []
    for f in files:
        names.append(f.stem)
        try:
            crystals.append(Crystal.from_cif(f, name=f.stem))
            errors.append(None)
        except CrystalError as e:
            crystals.append(None)
            errors.append(str(e))
    return StructureSet(crystals, names, errors, str(path))


def _read_ase(path: Path) -> StructureSet:
    import ase.io

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            images = ase.io.read(path, index=":")
    except Exception as e:
        raise CrystalError(f"{path}: cannot read structures ({type(e).__name__}: {e})") from e
    if not isinstance(images, list):
        images = [images]
    crystals, names, errors = [], [], []
    for i, atoms in enumerate(images):
        name = str(atoms.info.get("name", f"{path.name}[{i}]"))
        names.append(name)
        try:
            crystals.append(Crystal.from_ase(atoms, name=name))
            errors.append(None)
        except (CrystalError, ValueError) as e:
            crystals.append(None)
            errors.append(str(e))
    return StructureSet(crystals, names, errors, str(path))


def load_structure_set(
    spec: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = True,
    limit: int | None = None,
) -> StructureSet:
    """Reads every structure of a dataset split, CSV, CIF folder or ASE file, in order.

    Args:
      spec: ``NAME:SPLIT`` (e.g. ``perov_5:test``) or a path (module docstring).
      data_dir: where named datasets live (else ``$AUTOPERI_DATA``, the cache, a download).
      workers: processes for CIF parsing.
      progress: progress bar.
      limit: keep only the first ``limit`` entries.

    Raises:
      CrystalError / autoperi_jax.datasets.DatasetError: when the input itself cannot be
        found or read (single bad entries become ``None`` instead).
    """
    from autoperi_jax.datasets import resolve_dataset

    path = resolve_dataset(spec, data_dir)
    if path.is_dir():
        out = _read_cif_folder(path)
    elif ".csv" in path.name:
        out = _read_csv(path, workers, progress, limit)
    else:
        if path.stat().st_size == 0:
            raise CrystalError(f"{path}: file is empty")
        out = _read_ase(path)
    if len(out) == 0:
        raise CrystalError(f"{path}: holds no structures")
    return out.head(limit)
