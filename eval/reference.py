"""The reference side of a generation evaluation, from structures or from shipped statistics.

Generation metrics (validity rates, COV-R / COV-P, the density / #elements / property EMDs,
the space-group distribution, the report's histograms) need of the reference split only
per-structure numbers: the `eval.metrics.Features`, the CrystalNN and Magpie fingerprints
with their success flags, the property values and the names. `ReferenceStats` holds exactly
those, computed once from a split by `compute_reference_stats` and stored as a numpy ``.npz``
(``allow_pickle=False``): derived numbers, like a model's weights, not the structures.

Each shipped model carries the statistics of its test split
(``autoperi_jax/pretrained/NAME/reference/DATASET-SPLIT.npz``), so ``autoperi eval --task gen
--reference perov_5:test`` needs no dataset and skips the 3-4 minutes of reference
fingerprints. `load_reference` uses them when they were computed with the evaluation's
validity options and fingerprint versions, and when the split is either not available
locally or is byte-identical (SHA-256) to the file they were computed from; otherwise it
reads the structures (`eval.samples.load_structure_set`, which may download the split).

Rebuild a bundle's statistics with ``autoperi reference-stats --reference perov_5:test
--out autoperi_jax/pretrained/perov_5/reference/perov_5-test.npz``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from autoperi_jax.api import PRETRAINED_DIR
from autoperi_jax.datasets import DATASETS, DatasetError, resolve_dataset
from autoperi_jax.download import sha256_file
from eval import metrics as M
from eval.fingerprints import composition_fingerprints, fingerprint_versions, structure_fingerprints
from eval.samples import StructureSet, load_structure_set

__all__ = [
    "Fingerprints",
    "ReferenceStats",
    "compute_reference_stats",
    "fingerprints",
    "load_reference",
    "reference_side",
    "shipped_stats_path",
]

FORMAT = 1
_FEATURE_FIELDS = tuple(f.name for f in dataclasses.fields(M.Features))


@dataclasses.dataclass(frozen=True)
class Fingerprints:
    """CDVAE fingerprints of n structures.

    Attributes:
      struct: [n, 61] CrystalNN "ops" means (NaN rows where it failed); struct_ok: [n].
      comp: [n, 132] raw Magpie vectors; comp_ok: [n].
    """

    struct: np.ndarray
    struct_ok: np.ndarray
    comp: np.ndarray
    comp_ok: np.ndarray


@dataclasses.dataclass
class ReferenceStats:
    """The per-structure numbers of a reference split that generation metrics use.

    Attributes:
      spec: the split they describe (``perov_5:test``).
      source_sha256: SHA-256 of the split file they were computed from.
      names: [n] material ids, in file order.
      features: `eval.metrics.Features` of every structure.
      fingerprints: `Fingerprints` of every structure.
      properties: numeric columns, each [n] (NaN where missing).
      options: the validity options used (symprec, min_distance, min_volume).
      versions: the fingerprint libraries' versions (``matminer=..,pymatgen=..``).
      n_unreadable: entries that could not be parsed.
      source: where these statistics were read from.
    """

    spec: str
    source_sha256: str
    names: list[str]
    features: M.Features
    fingerprints: Fingerprints
    properties: dict[str, np.ndarray]
    options: dict[str, float]
    versions: str
    n_unreadable: int = 0
    source: str = ""

    def __len__(self) -> int:
        return len(self.names)

    def has_property(self, name: str) -> bool:
        return name in self.properties and bool(np.isfinite(self.properties[name]).any())

    def property_values(self, name: str) -> np.ndarray:
        """[n] values of a property (NaN where missing)."""
        v = self.properties.get(name)
        return np.full(len(self), np.nan) if v is None else v.copy()

    def incompatibility(self, symprec: float, min_distance: float, min_volume: float) -> str | None:
        """Why these statistics cannot stand in for the structures under these options
        (``None`` when they can)."""
        want = {"symprec": symprec, "min_distance": min_distance, "min_volume": min_volume}
        diff = {k: (self.options.get(k), v) for k, v in want.items() if self.options.get(k) != v}
        if diff:
            return ", ".join(f"{k} {a} (statistics) vs {b} (asked)" for k, (a, b) in diff.items())
        if self.versions != fingerprint_versions():
            return f"fingerprints made with {self.versions}, installed {fingerprint_versions()}"
        return None

    # ------------------------------------------------------------------------ npz
    def save(self, path: str | os.PathLike) -> Path:
        """Writes one compressed ``.npz`` (atomic rename; no pickle)."""
        path = Path(path)
        f = self.features
        arrays: dict[str, Any] = {
            f"feature_{k}": np.asarray(getattr(f, k), dtype=str if k == "formula" else None)
            for k in _FEATURE_FIELDS
        }
        fp = self.fingerprints
        arrays.update(
            struct_fp=fp.struct, struct_ok=fp.struct_ok, comp_fp=fp.comp, comp_ok=fp.comp_ok,
            names=np.asarray(self.names, dtype=str),
            property_names=np.asarray(list(self.properties), dtype=str),
            property_values=np.stack(list(self.properties.values()), 1)
            if self.properties else np.zeros((len(self), 0)),
            meta=np.asarray(json.dumps({
                "format": FORMAT, "spec": self.spec, "source_sha256": self.source_sha256,
                "options": self.options, "versions": self.versions,
                "n_unreadable": self.n_unreadable,
            })),
        )  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceStats:
        with np.load(path, allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
        meta = json.loads(str(a["meta"]))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: reference statistics format {meta.get('format')}, "
                             f"this version reads {FORMAT}")  # fmt: skip
        feats = {k: a[f"feature_{k}"] for k in _FEATURE_FIELDS}
        feats["formula"] = feats["formula"].tolist()
        names = a["property_names"].tolist()
        return cls(
            spec=meta["spec"], source_sha256=meta["source_sha256"], names=a["names"].tolist(),
            features=M.Features(**feats),
            fingerprints=Fingerprints(a["struct_fp"], a["struct_ok"], a["comp_fp"], a["comp_ok"]),
            properties={k: a["property_values"][:, i] for i, k in enumerate(names)},
            options=meta["options"], versions=meta["versions"],
            n_unreadable=meta["n_unreadable"], source=str(path),
        )  # fmt: skip


# ---------------------------------------------------------------------- computing
def fingerprints(
    ss: StructureSet,
    workers: int | None = None,
    cache_dir: str | None = None,
    use_cache: bool = True,
    progress: bool = True,
    comp: bool = True,
) -> Fingerprints:
    """Structure (and, with ``comp``, composition) fingerprints of a `StructureSet`."""
    kw = dict(workers=workers, cache_dir=cache_dir, use_cache=use_cache, progress=progress)
    s_fp, s_ok = structure_fingerprints(ss.crystals, **kw)
    if not comp:
        return Fingerprints(s_fp, s_ok, np.zeros((len(ss), 0)), np.ones(len(ss), bool))
    c_fp, c_ok = composition_fingerprints(ss.crystals, **kw)
    return Fingerprints(s_fp, s_ok, c_fp, c_ok)


def reference_side(
    reference: StructureSet | ReferenceStats,
    symprec: float,
    min_distance: float,
    min_volume: float,
    workers: int | None = None,
    cache_dir: str | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> tuple[M.Features, Fingerprints]:
    """Features and fingerprints of the reference: stored, or computed from its structures.

    Raises:
      ValueError: statistics computed under other options or fingerprint versions.
    """
    if isinstance(reference, ReferenceStats):
        why = reference.incompatibility(symprec, min_distance, min_volume)
        if why:
            raise ValueError(
                f"reference statistics {reference.source} do not apply: {why}; evaluate "
                f"against the split's structures instead (--no-reference-stats)"
            )
        return reference.features, reference.fingerprints
    feats = M.compute_features(
        reference.crystals, symprec=symprec, min_distance=min_distance, min_volume=min_volume,
        workers=workers, progress=progress, desc="reference: validity",
    )  # fmt: skip
    return feats, fingerprints(reference, workers, cache_dir, use_cache, progress)


def compute_reference_stats(
    spec: str,
    data_dir: str | os.PathLike | None = None,
    symprec: float = 0.1,
    min_distance: float = 0.5,
    min_volume: float = 0.1,
    workers: int | None = None,
    cache_dir: str | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> ReferenceStats:
    """Reads a split and computes its `ReferenceStats` (the defaults are `EvalOptions`')."""
    path = resolve_dataset(spec, data_dir)
    ss = load_structure_set(path, workers=workers, progress=progress)
    feats, fps = reference_side(
        ss, symprec, min_distance, min_volume, workers, cache_dir, use_cache, progress
    )
    props = sorted({k for c in ss.crystals if c is not None for k in c.properties})
    return ReferenceStats(
        spec=spec, source_sha256=sha256_file(path), names=list(ss.names), features=feats,
        fingerprints=fps, properties={k: ss.property_values(k) for k in props},
        options={"symprec": symprec, "min_distance": min_distance, "min_volume": min_volume},
        versions=fingerprint_versions(), n_unreadable=ss.n_unreadable, source=str(path),
    )  # fmt: skip


# ------------------------------------------------------------------------ choosing
def shipped_stats_path(spec: str) -> Path | None:
    """The statistics a shipped model carries for ``NAME:SPLIT``, if any."""
    name, _, split = str(spec).partition(":")
    if name not in DATASETS:
        return None
    hits = sorted(PRETRAINED_DIR.glob(f"*/reference/{name}-{split or 'train'}.npz"))
    return hits[0] if hits else None


def load_reference(
    spec: str,
    symprec: float = 0.1,
    min_distance: float = 0.5,
    min_volume: float = 0.1,
    data_dir: str | os.PathLike | None = None,
    use_stats: bool = True,
    workers: int | None = None,
    progress: bool = True,
) -> StructureSet | ReferenceStats:
    """The reference of a generation evaluation: shipped statistics where they apply
    (module docstring), else the split's structures."""
    path = shipped_stats_path(spec) if use_stats else None
    if path is not None:
        stats = ReferenceStats.load(path)
        why = stats.incompatibility(symprec, min_distance, min_volume)
        try:
            local = resolve_dataset(spec, data_dir, download=False)
        except DatasetError:
            local = None
        if why is None and (local is None or sha256_file(local) == stats.source_sha256):
            return stats
        if why is not None:
            warnings.warn(f"not using {path}: {why}", stacklevel=2)
    return load_structure_set(spec, data_dir=data_dir, workers=workers, progress=progress)
