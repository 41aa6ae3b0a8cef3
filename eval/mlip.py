"""The MLIP stability judge: CHGNet relaxation, formation energy, energy above a hull, S.U.N.

The field judges generated crystals by relaxing them with a machine-learned interatomic
potential and measuring their energy above a convex hull of known phases (MatterGen,
Crystalite, LeMat-GenBench). This module does that offline on CPU, as a separate torch step
(CHGNet is not differentiable inside the JAX model and never imported by the library).

Protocol (`RelaxSettings`, recorded in metrics.json):

* Relaxation: CHGNet (PyPI ``chgnet==0.4.2``, model 0.3.0, weights in the wheel) as an ASE
  calculator; ASE ``FIRE`` on ``FrechetCellFilter`` (positions and cell relaxed together,
  CHGNet's own default), until the largest generalised force (atomic forces and the
  filter's stress components) is <= ``fmax`` = 0.05 eV/A, at most ``max_steps`` = 500
  steps. ``converged`` says whether fmax was reached within the cap.
* Energy per atom: CHGNet's final energy / atoms, on the Materials Project
  MP2020-compatible scale CHGNet was trained on.
* Formation energy per atom: energy per atom minus the composition-weighted elemental
  reference energies, each element's lowest DFT energy per atom among the elemental
  phases of matcalc 0.7.0's ``MP-PBE`` reference set (88 elements; Yb is missing, so a
  crystal with Yb has no formation energy and counts as not stable). These are tabulated
  DFT numbers, not CHGNet relaxations of the elements, so the formation energy sits on the
  scale of MP's own formation energies.
* Relaxed match / RMSD: pymatgen ``StructureMatcher`` with the CDVAE tolerances
  (`autoperi_jax.protocol.CDVAE_MATCHER`: stol 0.5, ltol 0.3, angle_tol 10) between the
  input and the relaxed structure; ``rmsd`` = ``get_rms_dist(initial, relaxed)[0]``, the
  RMS displacement normalised by ``(V / n_atoms)^(1/3)`` (the CDVAE RMSE), defined only
  for structures that still match, so read the RMSD mean beside the match rate.
* Energy above hull: `FormationHull`, a convex hull of formation energies per atom (each
  element at 0 eV/atom), built per chemical system with pymatgen ``PhaseDiagram`` from the
  entries whose elements are a subset of the crystal's; ``e_hull`` = crystal's CHGNet
  formation energy minus the hull at its composition, negative when below the hull. The
  MP-20 hull (`mp20_hull`) holds every MP-20 row's DFT ``formation_energy_per_atom`` as
  stored in the CDVAE / MatterGen CSVs (train 27,136 rows from ``train_meta_all``, val and
  test), plus the elements at 0.
* S.U.N. (MatterGen's definition, our relaxation): stable (``e_hull <= 0.1`` eV/atom; also
  reported at ``<= 0``), unique (`eval.metrics.uniqueness` among the judged relaxed
  structures: pymatgen-default matcher within one reduced formula, first occurrence counts)
  and novel (`eval.metrics.novelty`: no training structure of the same reduced formula
  matches), on the RELAXED structures. Rates are over every judged structure (failures
  count as not stable).

Relaxations run in worker processes (``spawn``; ``OMP_NUM_THREADS=1`` and one torch thread
each: BLAS threads of several processes fighting made relaxations 4-8x slower) with a
progress bar. Each result is appended as one JSON line to a cache file as soon as it
arrives, keyed by a hash of the structure (species, cell, fractional coordinates) and the
settings, so an interrupted run keeps what it finished and a rerun skips it.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.metadata as md
import importlib.util
import json
import multiprocessing
import os
import time
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from autoperi_jax.crystal import Crystal
from autoperi_jax.protocol import CDVAE_MATCHER, NOVELTY_MATCHER

__all__ = [
    "STABLE_THRESHOLD",
    "FormationHull",
    "RelaxCache",
    "RelaxSettings",
    "below_rate",
    "default_cache_path",
    "elemental_energies",
    "formation_energy_per_atom",
    "mp20_hull",
    "relax_structures",
    "relaxed_crystal",
    "seeded_valid_subset",
    "structure_key",
    "summarize",
]

#: E_hull threshold of "stable" [eV/atom] (MatterGen, Crystalite: 0.1).
STABLE_THRESHOLD = 0.1
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclasses.dataclass(frozen=True)
class RelaxSettings:
    """How a structure is relaxed and judged (part of every cache key).

    Attributes:
      model: the MLIP; only ``chgnet`` (CHGNet 0.3.0 from ``chgnet==0.4.2``).
      optimizer: ASE optimizer (``FIRE``).
      cell_filter: ASE filter relaxing the cell with the positions (``FrechetCellFilter``);
        ``None`` keeps the cell fixed.
      fmax: convergence threshold on the largest generalised force [eV/A].
      max_steps: step cap.
      elemental_refs: matcalc reference set for formation energies (``MP-PBE``).
      match_tolerances: StructureMatcher tolerances of the relaxed match / RMSD (CDVAE's).
    """

    model: str = "chgnet"
    optimizer: str = "FIRE"
    cell_filter: str | None = "FrechetCellFilter"
    fmax: float = 0.05
    max_steps: int = 500
    elemental_refs: str = "MP-PBE"
    match_tolerances: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: dict(CDVAE_MATCHER)
    )

    def __post_init__(self) -> None:
        if self.model != "chgnet":
            raise ValueError(f"unknown MLIP {self.model!r}: only 'chgnet' is supported")
        if self.fmax <= 0 or self.max_steps < 1:
            raise ValueError("fmax must be > 0 and max_steps >= 1")

    def as_dict(self) -> dict[str, Any]:
        """The settings plus the versions of the packages that define the result."""
        d = dataclasses.asdict(self)
        d["match_tolerances"] = dict(self.match_tolerances)
        d["versions"] = {p: _version(p) for p in ("chgnet", "torch", "ase", "pymatgen")}
        return d


def _version(pkg: str) -> str:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "not installed"


def structure_key(crystal: Crystal, settings: RelaxSettings) -> str:
    """SHA-256 of the structure (species, cell to 1e-5 A, wrapped fractional coordinates to
    1e-6, in atom order) and the settings with package versions: the cache key."""
    frac = np.round(np.mod(crystal.frac_coords, 1.0), 6) % 1.0
    payload = {
        "numbers": np.asarray(crystal.numbers).tolist(),
        "cell": np.round(crystal.cell, 5).tolist(),
        "frac": frac.tolist(),
        "settings": settings.as_dict(),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).replace("-0.0,", "0.0,")
    return hashlib.sha256(blob.encode()).hexdigest()


def default_cache_path(settings: RelaxSettings | None = None) -> Path:
    """``cache_root() / "stability" / "chgnet-relax.jsonl"``."""
    from autoperi_jax.datasets import cache_root

    model = (settings or RelaxSettings()).model
    return cache_root() / "stability" / f"{model}-relax.jsonl"


# ------------------------------------------------------------------ formation energy
def _refs_file(name: str) -> Path:
    spec = importlib.util.find_spec("matcalc")  # located, not imported (heavy __init__)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "formation energies need matcalc's elemental references: pip install "
            "'autoperi-jax[stability]' (matcalc==0.7.0)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "elemental_refs"
    path = path / f"{name}-Element-Refs.json.gz"
    if not path.is_file():
        raise FileNotFoundError(f"no elemental reference set {name!r} in matcalc ({path})")
    return path


_REFS_CACHE: dict[str, dict[str, float]] = {}


def elemental_energies(name: str = "MP-PBE") -> dict[str, float]:
    """Element -> reference energy per atom [eV]: the lowest of the DFT energies per atom
    matcalc 0.7.0 tabulates for that element's phases (``energy_per_atom``)."""
    if name not in _REFS_CACHE:
        with gzip.open(_refs_file(name), "rt") as f:
            raw = json.load(f)
        out = {}
        for el, entry in raw.items():
            e = entry["energy_per_atom"]
            out[el] = float(min(e) if isinstance(e, list) else e)
        _REFS_CACHE[name] = out
    return _REFS_CACHE[name]


def _symbols(numbers: Sequence[int]) -> list[str]:
    from ase.data import chemical_symbols

    return [chemical_symbols[int(z)] for z in numbers]


def formation_energy_per_atom(
    numbers: Sequence[int], energy_per_atom: float, refs: Mapping[str, float]
) -> float:
    """``energy_per_atom - mean_i refs[element_i]`` [eV/atom]; NaN if an element has no
    reference energy."""
    syms = _symbols(numbers)
    if any(s not in refs for s in syms):
        return float("nan")
    return float(energy_per_atom - np.mean([refs[s] for s in syms]))


# ------------------------------------------------------------------------- the hull
class FormationHull:
    """Convex hull of formation energies per atom, per chemical system.

    Entries are (composition, formation energy per atom); every element sits at 0. For a
    query composition, pymatgen ``PhaseDiagram`` is built (once per chemical system) from
    the entries whose elements are a subset of the query's plus the elements at 0, and
    ``e_above_hull`` is the query's formation energy minus the hull there (negative when
    the query lies below the hull). Building one hull of all entries at once is not
    possible: MP-20 spans 89 elements.

    Args:
      formulas: [n] formulas (any pymatgen ``Composition`` string).
      e_form: [n] formation energies per atom [eV/atom].
      description: what the hull holds (written to metrics.json).
    """

    def __init__(
        self, formulas: Sequence[str], e_form: Sequence[float], description: str = ""
    ) -> None:
        from pymatgen.core import Composition

        self.description = description
        self.n_entries = 0
        self._by_system: dict[frozenset[str], list[tuple[Any, float]]] = defaultdict(list)
        for f, e in zip(formulas, e_form):
            if not np.isfinite(e):
                continue
            c = Composition(f)
            key = frozenset(el.symbol for el in c.elements)
            self._by_system[key].append((c, float(e)))
            self.n_entries += 1
        self._pds: dict[frozenset[str], Any] = {}

    def _phase_diagram(self, system: frozenset[str]):
        from itertools import combinations

        from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
        from pymatgen.core import Composition

        if system not in self._pds:
            entries = [PDEntry(Composition(el), 0.0) for el in sorted(system)]
            els = sorted(system)
            for k in range(1, len(els) + 1):
                for sub in combinations(els, k):
                    for c, e in self._by_system.get(frozenset(sub), ()):
                        entries.append(PDEntry(c, e * c.num_atoms))
            self._pds[system] = PhaseDiagram(entries)
        return self._pds[system]

    def e_above_hull(self, formula: str, e_form_per_atom: float) -> float:
        """Energy above the hull [eV/atom] of a phase with this composition and formation
        energy per atom (NaN for a NaN energy)."""
        from pymatgen.analysis.phase_diagram import PDEntry
        from pymatgen.core import Composition

        if not np.isfinite(e_form_per_atom):
            return float("nan")
        c = Composition(formula)
        pd = self._phase_diagram(frozenset(el.symbol for el in c.elements))
        entry = PDEntry(c, e_form_per_atom * c.num_atoms)
        _, e = pd.get_decomp_and_e_above_hull(entry, allow_negative=True)
        return float(e)


def mp20_hull(data_dir: str | os.PathLike | None = None) -> FormationHull:
    """The hull of every MP-20 crystal's DFT formation energy (see the module docstring).

    Reads ``mp_20/train_meta_all``, ``mp_20/val`` and ``mp_20/test`` (``.csv[.xz|.gz]``)
    from the folder the named ``mp_20:test`` split resolves to (``data_dir`` /
    ``$AUTOPERI_DATA`` / the cache; never downloaded).

    Raises:
      autoperi_jax.datasets.DatasetError / FileNotFoundError: a file is missing.
    """
    import pandas as pd

    from autoperi_jax.datasets import resolve_dataset

    folder = resolve_dataset("mp_20:test", data_dir, download=False).parent
    parts = []
    counts = {}
    for split, col in (("train_meta_all", "formula_mattergen"), ("val", "pretty_formula"),
                       ("test", "pretty_formula")):  # fmt: skip
        hits = [folder / f"{split}{s}" for s in (".csv", ".csv.xz", ".csv.gz")]
        path = next((p for p in hits if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(
                f"the MP-20 hull needs {split}.csv[.xz] beside {folder}/test.csv.xz (the "
                "train file with formulas and formation energies of all 27,136 rows)"
            )
        df = pd.read_csv(path, usecols=["material_id", col, "formation_energy_per_atom"])
        parts.append(df.rename(columns={col: "formula"}))
        counts[split] = len(df)
    df = pd.concat(parts, ignore_index=True).drop_duplicates("material_id")
    desc = (
        f"MP-20 DFT convex hull: {len(df):,} entries, every row of MP-20 train "
        f"({counts['train_meta_all']:,}, train_meta_all), val ({counts['val']:,}) and test "
        f"({counts['test']:,}), each its Materials Project DFT formation_energy_per_atom as "
        "stored in the CDVAE / MatterGen CSVs, plus every element at 0 eV/atom; hull per "
        f"chemical system (pymatgen PhaseDiagram), read from {folder}"
    )
    return FormationHull(df["formula"].tolist(), df["formation_energy_per_atom"].to_numpy(), desc)


# ----------------------------------------------------------------------- relaxation
_CALC: Any = None


def _init_worker() -> None:
    """Pool initialiser: one thread per worker, CHGNet loaded once."""
    for v in _THREAD_VARS:
        os.environ[v] = "1"
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass
    _calculator()


def _calculator():
    global _CALC
    if _CALC is None:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                from chgnet.model.dynamics import CHGNetCalculator
            except ImportError as e:
                raise ImportError(
                    f"the stability judge needs CHGNet and torch ({e}): pip install "
                    "'autoperi-jax[stability]'"
                ) from e

            # "error": an atom with no neighbour within CHGNet's cut-off is a failure,
            # not a silently wrong energy
            _CALC = CHGNetCalculator(use_device="cpu", on_isolated_atoms="error")
    return _CALC


class _one_torch_thread:
    """In-process relaxations on one torch thread (restored afterwards)."""

    def __enter__(self):
        try:
            import torch
        except ImportError:  # relax_one reports the missing dependency per structure
            self.torch = None
            return self
        self.torch, self.threads = torch, torch.get_num_threads()
        torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self.torch is not None:
            self.torch.set_num_threads(self.threads)


def _relax_task(task: tuple[int, np.ndarray, np.ndarray, np.ndarray, dict]) -> tuple[int, dict]:
    idx, cell, frac, numbers, settings = task
    return idx, relax_one(Crystal(cell, frac, numbers), RelaxSettings(**settings))


def relax_one(crystal: Crystal, settings: RelaxSettings) -> dict[str, Any]:
    """Relaxes one crystal and judges it (module docstring); never raises for a structure.

    Returns:
      A JSON-able record: ``ok``, ``error``, ``energy_per_atom``,
      ``initial_energy_per_atom``, ``formation_energy_per_atom``, ``steps``, ``converged``,
      ``fmax_final``, ``volume_change`` (relative), ``relaxed_match``, ``rmsd``,
      ``relaxed`` ({cell, frac, numbers}), ``wall_s``.
    """
    import ase.filters
    import ase.optimize

    from autoperi_jax.distinct import matcher

    t0 = time.perf_counter()
    rec: dict[str, Any] = {"n_atoms": crystal.num_atoms, "ok": False, "error": None}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            atoms = crystal.to_ase()
            atoms.info.clear()
            atoms.calc = _calculator()
            n = len(atoms)
            rec["initial_energy_per_atom"] = float(atoms.get_potential_energy()) / n
            target = atoms
            if settings.cell_filter:
                target = getattr(ase.filters, settings.cell_filter)(atoms)
            opt = getattr(ase.optimize, settings.optimizer)(target, logfile=None)
            converged = bool(opt.run(fmax=settings.fmax, steps=settings.max_steps))
            e = float(atoms.get_potential_energy()) / n
            fmax_final = float(np.linalg.norm(target.get_forces(), axis=1).max())
        if not np.isfinite(e):
            raise FloatingPointError("non-finite CHGNet energy")
        relaxed = Crystal.from_ase(atoms)
        rec.update(
            ok=True, energy_per_atom=e, steps=int(opt.nsteps), converged=converged,
            fmax_final=fmax_final, volume_change=float(relaxed.volume / crystal.volume - 1),
            formation_energy_per_atom=formation_energy_per_atom(
                crystal.numbers, e, elemental_energies(settings.elemental_refs)
            ),
            relaxed={"cell": relaxed.cell.tolist(), "frac": relaxed.frac_coords.tolist(),
                     "numbers": relaxed.numbers.tolist()},
        )  # fmt: skip
        rms = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = matcher(settings.match_tolerances).get_rms_dist(
                    crystal.to_pymatgen(), relaxed.to_pymatgen()
                )
            rms = None if r is None else float(r[0])
        except Exception:  # pymatgen cannot match it: counts as no match
            rms = None
        rec.update(relaxed_match=rms is not None, rmsd=rms)
    except ImportError:  # a missing dependency is no property of the structure: not cached
        raise
    except Exception as e:  # recorded, not fatal: one bad structure must not stop a run
        rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:500])
    rec["wall_s"] = time.perf_counter() - t0
    return rec


class RelaxCache:
    """Relaxation records by key, in a JSON-lines file appended one line per structure.

    A line is ``{"key": ..., "record": {...}}``. A truncated last line (an interrupted
    write) is ignored on reading. No pickle: the file is plain data.
    """

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = None if path is None else Path(path)
        self.records: dict[str, dict] = {}
        self._newline = False  # an interrupted write left the last line unterminated
        if self.path is not None and self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                self._newline = f.read(1) != b"\n"
            with open(self.path) as f:
                for line in f:
                    try:
                        d = json.loads(line)
                        self.records[d["key"]] = d["record"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def add(self, key: str, record: dict) -> None:
        self.records[key] = record
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"key": key, "record": record}, allow_nan=True)
        with open(self.path, "a") as f:
            f.write(("\n" if self._newline else "") + line + "\n")
            f.flush()
        self._newline = False


def relax_structures(
    crystals: Sequence[Crystal],
    names: Sequence[str] | None = None,
    settings: RelaxSettings | None = None,
    workers: int = 1,
    cache: str | os.PathLike | RelaxCache | None = None,
    progress: bool = True,
    desc: str = "CHGNet relax",
) -> list[dict[str, Any]]:
    """Relaxes and judges every crystal (`relax_one`), reusing cached records.

    Args:
      crystals: [n] structures.
      names: [n] names written into the records (default ``"0"``, ``"1"``, ...).
      settings: `RelaxSettings` (default: the protocol's).
      workers: processes (``spawn``, one thread each); 0 relaxes in this process (tests).
      cache: JSON-lines cache path or `RelaxCache` (``None``: no cache).
      progress: tqdm progress bar.
      desc: progress-bar label.

    Returns:
      [n] records (`relax_one`), each with ``name``, ``key``, ``formula`` and ``cached``.
    """
    from tqdm.auto import tqdm

    from autoperi_jax.distinct import reduced_formula

    settings = settings or RelaxSettings()
    names = [str(i) for i in range(len(crystals))] if names is None else list(names)
    store = cache if isinstance(cache, RelaxCache) else RelaxCache(cache)
    keys = [structure_key(c, settings) for c in crystals]
    out: list[dict[str, Any] | None] = [None] * len(crystals)
    todo: dict[str, list[int]] = defaultdict(list)  # a structure given twice relaxes once
    for i, k in enumerate(keys):
        if k in store:
            out[i] = dict(store.records[k], cached=True)
        else:
            todo[k].append(i)

    def done(i: int, rec: dict) -> None:
        store.add(keys[i], rec)
        for j in todo[keys[i]]:
            out[j] = dict(rec, cached=False)

    first = [idx[0] for idx in todo.values()]
    bar = tqdm(total=len(first), desc=desc, unit="crystal", disable=not progress or not first)
    sdict = dataclasses.asdict(settings)
    if first and workers > 0:
        import concurrent.futures as cf

        saved = {v: os.environ.get(v) for v in _THREAD_VARS}
        os.environ.update({v: "1" for v in _THREAD_VARS})  # spawned children inherit
        try:
            ctx = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(
                max_workers=min(workers, len(first)), mp_context=ctx, initializer=_init_worker
            ) as ex:
                futs = [
                    ex.submit(_relax_task, (i, crystals[i].cell, crystals[i].frac_coords,
                                            crystals[i].numbers, sdict))
                    for i in first
                ]  # fmt: skip
                for fut in cf.as_completed(futs):
                    i, rec = fut.result()
                    done(i, rec)
                    bar.update(1)
        finally:
            for v, old in saved.items():
                if old is None:
                    os.environ.pop(v, None)
                else:
                    os.environ[v] = old
    elif first:
        with _one_torch_thread():
            for i in first:
                done(i, relax_one(crystals[i], settings))
                bar.update(1)
    bar.close()
    result = []
    for i, rec in enumerate(out):
        assert rec is not None
        rec = dict(rec, name=names[i], key=keys[i], formula=reduced_formula(crystals[i]))
        result.append(rec)
    return result


# -------------------------------------------------------------------------- summary
def relaxed_crystal(rec: Mapping[str, Any]) -> Crystal | None:
    """The relaxed structure of a record (``None`` when the relaxation failed)."""
    r = rec.get("relaxed")
    if not rec.get("ok") or r is None:
        return None
    return Crystal(np.array(r["cell"]), np.array(r["frac"]), np.array(r["numbers"]))


def _stat(x: np.ndarray, fn) -> float | None:
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    return float(fn(x)) if len(x) else None


def summarize(
    records: Sequence[Mapping[str, Any]],
    hull: FormationHull | None = None,
    train: Sequence[Crystal] | None = None,
    threshold: float = STABLE_THRESHOLD,
    workers: int | None = 1,
    progress: bool = False,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Stability metrics of judged structures (`relax_structures` records).

    Args:
      records: [n] records; every one counts in the rates' denominators.
      hull: `FormationHull` for ``e_hull``, ``stable_rate`` and the S.U.N. rates.
      train: training structures for novelty (S.U.N. needs it).
      threshold: E_hull of "stable" [eV/atom] (0.1).
      workers, progress: for uniqueness / novelty.

    Returns:
      (metrics, per-structure arrays: ``e_hull``, ``e_form``, ``stable``, ``unique``,
      ``novel``).
    """
    from eval import metrics as M

    n = len(records)
    ok = np.array([bool(r.get("ok")) for r in records], bool)
    f = lambda k: np.array([r.get(k) if r.get(k) is not None else np.nan for r in records], float)  # noqa: E731
    e, ef = f("energy_per_atom"), f("formation_energy_per_atom")
    match = np.array([bool(r.get("relaxed_match")) for r in records], bool)
    conv = np.array([bool(r.get("converged")) for r in records], bool)
    m: dict[str, Any] = {
        "stability_n": n,
        "stability_n_failed": int((~ok).sum()),
        "stability_converged_rate": float(conv.mean()) if n else None,
        "stability_relaxed_match_rate": float(match.mean()) if n else None,
        "stability_rmsd_mean": _stat(f("rmsd"), np.mean),
        "stability_energy_per_atom_mean": _stat(e, np.mean),
        "stability_energy_per_atom_median": _stat(e, np.median),
        "stability_formation_energy_mean": _stat(ef, np.mean),
        "stability_formation_energy_median": _stat(ef, np.median),
        "stability_volume_change_mean": _stat(f("volume_change"), np.mean),
        "stability_steps_mean": _stat(f("steps"), np.mean),
    }
    arrays: dict[str, np.ndarray] = {"e_form": ef}
    if hull is None:
        return m, arrays
    eh = np.array([hull.e_above_hull(r["formula"], x) for r, x in zip(records, ef)])
    arrays["e_hull"] = eh
    ehf = np.nan_to_num(eh, nan=np.inf)
    stable, stable0 = ehf <= threshold, ehf <= 0.0
    arrays["stable"] = stable
    m.update(
        stability_e_hull_mean=_stat(eh, np.mean),
        stability_e_hull_median=_stat(eh, np.median),
        stable_rate=float(stable.mean()) if n else None,
        stable_rate_0=float(stable0.mean()) if n else None,
    )
    relaxed = [relaxed_crystal(r) for r in records]
    have = np.array([c is not None for c in relaxed], bool)
    formulas = [r["formula"] for r in records]
    u = M.uniqueness(relaxed, formulas, have, NOVELTY_MATCHER, workers, progress)
    arrays["unique"] = u["is_first"] & have
    m["stability_unique_rate"] = float(arrays["unique"].mean()) if n else None
    if train is not None:
        tform = [M.reduced_formula(t) for t in train]
        nv = M.novelty(relaxed, formulas, list(train), tform, have, NOVELTY_MATCHER, workers,
                       progress)  # fmt: skip
        novel = nv["is_novel"] & have
        arrays["novel"] = novel
        m["stability_novel_rate"] = float(novel.mean()) if n else None
        m["sun_rate"] = float((stable & arrays["unique"] & novel).mean()) if n else None
        m["sun_rate_0"] = float((stable0 & arrays["unique"] & novel).mean()) if n else None
    return m, arrays


def below_rate(values: np.ndarray, threshold: float | None) -> float | None:
    """Share of ``values`` <= ``threshold`` (NaN counts as above; None without a threshold
    or values)."""
    v = np.asarray(values, float)
    if threshold is None or not np.isfinite(threshold) or not len(v):
        return None
    return float((np.nan_to_num(v, nan=np.inf) <= threshold).mean())


def seeded_valid_subset(
    crystals: Sequence[Crystal | None], n: int | None, seed: int
) -> tuple[np.ndarray, int]:
    """A seeded subset for judging real data as samples without the full evaluation.

    Walks the readable structures in ``numpy.random.default_rng(seed).permutation`` order
    and keeps the first ``n`` that are structurally and compositionally valid (the
    evaluation's validity rule without its CrystalNN-fingerprint condition), so only the
    visited structures are checked.

    Returns:
      (sorted indices, number of structures checked).
    """
    from eval import metrics as M

    readable = np.array([i for i, c in enumerate(crystals) if c is not None])
    order = np.random.default_rng(seed).permutation(readable)
    keep, checked = [], 0
    for i in order:
        if n is not None and len(keep) >= n:
            break
        checked += 1
        c = crystals[i]
        if M.structure_validity(c) and M.smact_validity(c.numbers):
            keep.append(int(i))
    return np.sort(np.array(keep, int)), checked


def protocol(settings: RelaxSettings, hull: FormationHull | None, threshold: float) -> dict:
    """The judge's protocol as written to metrics.json."""
    return {
        "relaxation": settings.as_dict(),
        "energy": "CHGNet 0.3.0 energy per atom after relaxation (MP2020-compatible scale)",
        "formation_energy": f"energy per atom minus composition-weighted elemental energies: "
        f"lowest DFT energy per atom of each element in matcalc 0.7.0 "
        f"'{settings.elemental_refs}' (88 elements, no Yb)",
        "rmsd": "StructureMatcher(match_tolerances).get_rms_dist(initial, relaxed)[0], "
        "normalised by (V/N)^(1/3); mean over structures that still match",
        "relaxed_match": "StructureMatcher(match_tolerances).fit(initial, relaxed)",
        "hull": hull.description if hull is not None else None,
        "e_hull": "CHGNet formation energy per atom minus the hull at the composition "
        "(negative below the hull)",
        "stable_threshold_ev_per_atom": threshold,
        "stable_rate": f"share of judged structures with e_hull <= {threshold} eV/atom "
        "(stable_rate_0: <= 0); failures count as not stable",
        "sun_rate": "stable AND unique (eval.metrics.uniqueness on relaxed structures, "
        "NOVELTY_MATCHER) AND novel (eval.metrics.novelty vs the train split, relaxed "
        "structures) over every judged structure; sun_rate_0 with e_hull <= 0",
        "workers": "spawned processes, OMP_NUM_THREADS=1, one torch thread each",
        "nan_note": "NaN energies / hull distances are written as null",
    }
