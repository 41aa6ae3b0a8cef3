"""The field's metrics for crystal generative models, exactly as CDVAE defines them.

Every number that papers on Perov-5 / Carbon-24 / MP-20 compare comes from CDVAE's
``scripts/compute_metrics.py`` and ``scripts/eval_utils.py`` (Xie et al., ICLR 2022,
https://github.com/txie-93/cdvae). This module re-implements those definitions (it does not
copy the code) and adds the numbers that make them readable: the match-rate ceiling, the
spread of the 1,000-sample EMD over seeds, uniqueness, novelty, lattice errors and
space-group statistics. Each public function's docstring states its rule and its source.

Conventions:

* Rates are fractions in [0, 1] (papers print percentages).
* A sample that could not be read or constructed is ``None``: it counts in every
  denominator and is invalid.
* "valid" = compositionally valid AND structurally valid AND (as in CDVAE) its CrystalNN
  fingerprint could be computed (``fingerprint_validity=True``).

Hooks for quantities that need a model or physics (`emd_report` with precomputed property
values, `stability_rate` with a stability callable) take those values as inputs, so
``autoperi bench`` can wire them in without changes here.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from autoperi_jax.crystal import Crystal
from autoperi_jax.distinct import DistinctFilter, matcher, reduced_formula, safe_fit
from autoperi_jax.matching import match_rms, match_summary
from autoperi_jax.parallel import parallel_map
from autoperi_jax.physics.composition_host import smact_validity
from autoperi_jax.protocol import CDVAE_MATCHER, COV_CUTOFFS, NOVELTY_MATCHER
from eval.fingerprints import cdvae_comp_scale

__all__ = [
    "CDVAE_MATCHER",
    "COV_CUTOFFS",
    "NOVELTY_MATCHER",
    "Features",
    "compute_features",
    "conditional_metrics",
    "coverage",
    "crystal_validity",
    "draw_indices",
    "emd",
    "emd_report",
    "fingerprint_diversity",
    "lattice_mae",
    "nearest_distance",
    "novelty",
    "reconstruction_metrics",
    "reduced_formula",
    "smact_validity",
    "spacegroup_distribution",
    "spacegroup_preserved",
    "stability_rate",
    "structure_validity",
    "time_per_valid_structure",
    "uniqueness",
    "validity_rates",
]


# ============================================================================ validity
def _as_structure(x):
    from pymatgen.core import Structure

    if isinstance(x, Structure):
        return x
    if isinstance(x, Crystal):
        return x.to_pymatgen()
    raise TypeError(f"expected a Crystal or pymatgen Structure, got {type(x).__name__}")


def structure_validity(crystal, cutoff: float = 0.5, min_volume: float = 0.1) -> bool:
    """Structural validity: CDVAE ``eval_utils.structure_validity`` plus its volume check.

    Rule: with pymatgen's ``Structure.distance_matrix`` (shortest periodic distance between
    every pair of distinct sites; the diagonal is padded, so an atom's distance to its own
    images is NOT tested), the structure is valid iff every entry is >= ``cutoff`` (0.5 A)
    and the cell volume is >= ``min_volume`` (0.1 A^3; CDVAE ``Crystal.get_structure``
    marks smaller cells unconstructed, hence invalid).

    Args:
      crystal: `Crystal` or pymatgen ``Structure``.
      cutoff: minimum interatomic distance in A.
      min_volume: minimum cell volume in A^3.
    """
    s = _as_structure(crystal)
    if s.volume < min_volume:
        return False
    if len(s) < 2:
        return True
    d = np.asarray(s.distance_matrix, dtype=np.float64)
    d = d + np.diag(np.full(len(d), cutoff + 10.0))
    return bool(d.min() >= cutoff)


# ============================================================================ features
@dataclasses.dataclass
class Features:
    """Per-structure quantities every metric needs, as arrays of length n.

    Attributes:
      constructed: [n] the structure exists (parsed, positive volume >= ``min_volume``).
      comp_valid, struct_valid: [n] `smact_validity` / `structure_validity`.
      density: [n] pymatgen ``Structure.density`` (g/cm^3), NaN if not constructed.
      n_elements: [n] number of distinct elements (``len(set(structure.species))``).
      num_atoms: [n] atoms per cell.
      lattice: [n, 6] a, b, c (A), alpha, beta, gamma (deg) of the cell as given.
      lattice_niggli: [n, 6] the same for the Niggli-reduced cell.
      spacegroup: [n] spglib international number at ``symprec`` (0 if none).
      min_distance: [n] shortest distance between distinct sites (pymatgen distance matrix).
      formula: [n] pymatgen reduced formula ("" if not constructed).
    """

    constructed: np.ndarray
    comp_valid: np.ndarray
    struct_valid: np.ndarray
    density: np.ndarray
    n_elements: np.ndarray
    num_atoms: np.ndarray
    lattice: np.ndarray
    lattice_niggli: np.ndarray
    spacegroup: np.ndarray
    min_distance: np.ndarray
    formula: list[str]

    def __len__(self) -> int:
        return len(self.constructed)

    def subset(self, idx: np.ndarray) -> Features:
        idx = np.asarray(idx)
        kw = {
            f.name: (
                [getattr(self, f.name)[i] for i in idx]
                if f.name == "formula"
                else getattr(self, f.name)[idx]
            )
            for f in dataclasses.fields(self)
        }
        return Features(**kw)


_NAN6 = (float("nan"),) * 6


def crystal_validity(crystals: Sequence[Crystal]) -> tuple[np.ndarray, np.ndarray]:
    """CDVAE's validity of each crystal, serially (no fingerprints; `compute_features` is
    the parallel path of the evaluation): ``(struct, comp)`` bool arrays [n] from
    `structure_validity` (distances >= 0.5 A, volume >= 0.1 A^3) and `smact_validity`
    (SMACT 2.2.1 rule). A crystal is valid when both hold."""
    struct = np.array([structure_validity(c) for c in crystals], bool)
    comp = np.array([smact_validity(c.numbers.tolist()) for c in crystals], bool)
    return struct, comp


def _features_one(c: Crystal | None, symprec: float, cutoff: float, min_volume: float) -> dict:
    empty = {
        "constructed": False,
        "comp_valid": False,
        "struct_valid": False,
        "density": float("nan"),
        "n_elements": 0,
        "num_atoms": 0,
        "lattice": _NAN6,
        "lattice_niggli": _NAN6,
        "spacegroup": 0,
        "min_distance": float("nan"),
        "formula": "",
    }
    if c is None:
        return empty
    import spglib

    out = dict(empty)
    out["comp_valid"] = smact_validity(c.numbers)
    out["num_atoms"] = c.num_atoms
    out["n_elements"] = len(set(c.numbers.tolist()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = c.to_pymatgen()
        out["formula"] = reduced_formula(c)
        out["lattice"] = tuple(float(v) for v in c.lattice_params)
        if s.volume < min_volume:  # CDVAE: 'unrealistically_small_lattice'
            return out
        out["constructed"] = True
        out["density"] = float(s.density)
        if len(s) > 1:
            d = np.asarray(s.distance_matrix) + np.diag(np.full(len(s), np.inf))
            out["min_distance"] = float(d.min())
        else:
            out["min_distance"] = float("inf")
        out["struct_valid"] = bool(out["min_distance"] >= cutoff)
        try:
            lat = s.lattice.get_niggli_reduced_lattice()
            out["lattice_niggli"] = (*lat.abc, *lat.angles)
        except Exception:
            pass
        try:
            ds = spglib.get_symmetry_dataset((c.cell, c.frac_coords, c.numbers), symprec=symprec)
            out["spacegroup"] = 0 if ds is None else int(ds.number)
        except Exception:
            pass
    return out


def _features_chunk(items: list[tuple[Crystal | None, float, float, float]]) -> list[dict]:
    # spglib prints a line to stderr for every structure it cannot symmetrise (common for
    # generated samples); silence it unless the user asked for it.
    os.environ.setdefault("SPGLIB_WARNING", "OFF")
    return [_features_one(*it) for it in items]


def compute_features(
    crystals: Sequence[Crystal | None],
    symprec: float = 0.1,
    min_distance: float = 0.5,
    min_volume: float = 0.1,
    workers: int | None = None,
    progress: bool = True,
    desc: str = "validity and features",
) -> Features:
    """Validity and per-structure features of every structure, in parallel.

    Args:
      crystals: structures (``None`` = could not be read; invalid, not constructed).
      symprec: spglib tolerance (A) for space groups.
      min_distance: structural-validity distance cut-off (A).
      min_volume: structural-validity volume cut-off (A^3).
      workers: processes (default: every core).
      progress: progress bar.
      desc: progress-bar label.
    """
    items = [(c, symprec, min_distance, min_volume) for c in crystals]
    rows = parallel_map(
        _features_chunk, items, workers=workers, chunk_size=128, desc=desc, progress=progress,
        unit="structure",
    )  # fmt: skip
    n = len(rows)

    def col(k, dtype):
        return np.array([r[k] for r in rows], dtype=dtype).reshape(
            (n, -1) if k.startswith("lattice") else (n,)
        )

    return Features(
        constructed=col("constructed", bool),
        comp_valid=col("comp_valid", bool),
        struct_valid=col("struct_valid", bool),
        density=col("density", np.float64),
        n_elements=col("n_elements", np.int64),
        num_atoms=col("num_atoms", np.int64),
        lattice=col("lattice", np.float64),
        lattice_niggli=col("lattice_niggli", np.float64),
        spacegroup=col("spacegroup", np.int64),
        min_distance=col("min_distance", np.float64),
        formula=[r["formula"] for r in rows],
    )


def validity_rates(
    features: Features, fingerprint_ok: np.ndarray | None = None
) -> dict[str, float | int]:
    """CDVAE ``GenEval.get_validity``: means over ALL samples of the three flags.

    ``comp_validity`` = share passing `smact_validity`; ``struct_validity`` = share passing
    `structure_validity` (unconstructed samples fail); ``validity`` = both, and (CDVAE
    ``Crystal.get_fingerprints``) a computable CrystalNN fingerprint when
    ``fingerprint_ok`` is given.
    """
    valid = features.comp_valid & features.struct_valid
    if fingerprint_ok is not None:
        valid = valid & np.asarray(fingerprint_ok, bool)
    n = len(features)
    return {
        "comp_validity": float(features.comp_valid.mean()) if n else 0.0,
        "struct_validity": float(features.struct_valid.mean()) if n else 0.0,
        "validity": float(valid.mean()) if n else 0.0,
        "n": n,
        "n_valid": int(valid.sum()),
    }


# ============================================================================ coverage
def nearest_distance(
    a: np.ndarray, b: np.ndarray, block: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance of every row of ``a`` to its nearest row of ``b`` and vice versa.

    Computed in blocks so 10,000 x 10,000 sets never hold the full distance matrix.

    Returns:
      (min over b for each a [len(a)], min over a for each b [len(b)]).
    """
    from scipy.spatial.distance import cdist

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a_min = np.full(len(a), np.inf)
    b_min = np.full(len(b), np.inf)
    if len(a) == 0 or len(b) == 0:
        return a_min, b_min
    for s in range(0, len(a), block):
        d = cdist(a[s : s + block], b)
        a_min[s : s + block] = d.min(axis=1)
        b_min = np.minimum(b_min, d.min(axis=0))
    return a_min, b_min


def coverage(
    sample_struct_fps: np.ndarray,
    sample_comp_fps: np.ndarray,
    ref_struct_fps: np.ndarray,
    ref_comp_fps: np.ndarray,
    struct_cutoff: float,
    comp_cutoff: float,
    sample_ok: np.ndarray | None = None,
    num_generated: int | None = None,
    return_nearest: bool = False,
) -> dict[str, float] | tuple[dict[str, float], np.ndarray, np.ndarray]:
    """COV-R / COV-P: CDVAE ``eval_utils.compute_cov`` (called by ``GenEval.get_coverage``).

    Rule: structure distances are Euclidean distances between CrystalNN fingerprints;
    composition distances are Euclidean distances between Magpie fingerprints standardised
    with CDVAE's fixed ``CompScaler`` (`cdvae_comp_scale`). The structure and composition
    nearest neighbours are taken SEPARATELY (they may be different crystals).

    * COV-R (recall) = share of reference crystals whose nearest generated structure
      distance <= ``struct_cutoff`` AND nearest generated composition distance <=
      ``comp_cutoff``.
    * COV-P (precision) = number of generated crystals whose nearest reference distances
      pass both cut-offs, divided by ``num_generated`` = ALL generated crystals, including
      those without a fingerprint (CDVAE passes every generated crystal, valid or not, and
      drops only those whose fingerprint failed; they still count in the denominator).
    * AMSD / AMCD (recall, precision): mean of those nearest structure / composition
      distances.

    Args:
      sample_struct_fps: [n_gen, 61] generated CrystalNN fingerprints.
      sample_comp_fps: [n_gen, 132] generated raw Magpie fingerprints.
      ref_struct_fps: [n_ref, 61] reference (test split) CrystalNN fingerprints.
      ref_comp_fps: [n_ref, 132] reference raw Magpie fingerprints.
      struct_cutoff, comp_cutoff: `COV_CUTOFFS` of the dataset.
      sample_ok: [n_gen] generated crystals whose fingerprints exist (default: all).
      num_generated: denominator of COV-P (default: n_gen).
      return_nearest: also return each reference crystal's nearest generated structure
        and composition distances ([n_ref] each; recall misses are those beyond a cut-off).

    Returns:
      cov_recall, cov_precision, amsd_recall, amsd_precision, amcd_recall, amcd_precision,
      and the precision misses by cause: ``cov_precision_miss_struct_only`` /
      ``_comp_only`` / ``_both`` (shares of ``num_generated`` beyond the structure cut-off
      only, the composition cut-off only, or both); with ``return_nearest``, the tuple
      (that dict, [n_ref] structure distances, [n_ref] composition distances).
    """
    n_gen = len(sample_struct_fps)
    ok = np.ones(n_gen, bool) if sample_ok is None else np.asarray(sample_ok, bool)
    num_generated = n_gen if num_generated is None else num_generated
    s_fp = np.asarray(sample_struct_fps)[ok]
    c_fp = cdvae_comp_scale(np.asarray(sample_comp_fps)[ok])
    r_s, r_c = np.asarray(ref_struct_fps), cdvae_comp_scale(ref_comp_fps)
    if np.isnan(r_s).any():
        raise ValueError("reference structure fingerprints contain NaN (failed CrystalNN)")
    s_prec, s_rec = nearest_distance(s_fp, r_s)
    c_prec, c_rec = nearest_distance(c_fp, r_c)
    recall_hits = (s_rec <= struct_cutoff) & (c_rec <= comp_cutoff)
    precision_hits = (s_prec <= struct_cutoff) & (c_prec <= comp_cutoff)

    def mean(x):
        return float(np.mean(x)) if len(x) and np.isfinite(x).all() else float("nan")

    far_s, far_c = s_prec > struct_cutoff, c_prec > comp_cutoff

    def share_of_generated(hits):
        return float(hits.sum() / num_generated) if num_generated else 0.0

    out = {
        "cov_recall": float(recall_hits.mean()) if len(recall_hits) else 0.0,
        "cov_precision": share_of_generated(precision_hits),
        # why generated crystals miss, as shares of num_generated (they add up with
        # COV-P and the fingerprint failures to 1)
        "cov_precision_miss_struct_only": share_of_generated(far_s & ~far_c),
        "cov_precision_miss_comp_only": share_of_generated(~far_s & far_c),
        "cov_precision_miss_both": share_of_generated(far_s & far_c),
        "amsd_recall": mean(s_rec),
        "amsd_precision": mean(s_prec),
        "amcd_recall": mean(c_rec),
        "amcd_precision": mean(c_prec),
    }
    return (out, s_rec, c_rec) if return_nearest else out


def fingerprint_diversity(fps: np.ndarray) -> float:
    """CDVAE ``get_fp_pdist``: mean pairwise Euclidean distance between fingerprints
    (``comp_div`` uses CompScaler-standardised Magpie, ``struct_div`` CrystalNN)."""
    from scipy.spatial.distance import pdist

    fps = np.asarray(fps, np.float64)
    return float(pdist(fps).mean()) if len(fps) > 1 else float("nan")


# ================================================================================= EMD
def emd(a: Sequence[float], b: Sequence[float]) -> float:
    """1-D earth mover's distance, ``scipy.stats.wasserstein_distance(a, b)`` (CDVAE
    ``GenEval.get_density_wdist`` / ``get_num_elem_wdist`` / ``get_prop_wdist``)."""
    from scipy.stats import wasserstein_distance

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    return float(wasserstein_distance(a, b))


def draw_indices(n_valid: int, n_draw: int, seed: int) -> np.ndarray | None:
    """CDVAE's draw of ``n_draw`` valid samples without replacement
    (``np.random.choice(len(valid), n_samples, replace=False)``), here seeded:
    ``np.random.RandomState(seed).choice``. None if there are fewer than ``n_draw``."""
    if n_valid < n_draw:
        return None
    return np.random.RandomState(seed).choice(n_valid, n_draw, replace=False)


def emd_report(
    sample_values: np.ndarray,
    ref_values: np.ndarray,
    valid: np.ndarray,
    n_draw: int = 1000,
    seeds: Sequence[int] = tuple(range(10)),
) -> dict[str, Any]:
    """EMD between valid samples and ALL reference crystals, CDVAE-style and on all samples.

    Rule (CDVAE ``GenEval``): draw ``n_draw`` (1,000) samples without replacement from the
    VALID generated crystals, compute ``wasserstein_distance(drawn, reference)`` where the
    reference is every test crystal (valid or not). CDVAE used one unseeded draw; here it
    is repeated for each seed in ``seeds`` and the mean, standard deviation and per-seed
    values are reported, plus the EMD of all valid samples (``all_valid``), which has no
    draw noise.

    This is also the hook for the property EMD: pass precomputed property values (NaN
    where a sample has none; those are dropped after the draw).

    Args:
      sample_values: [n_gen] values of every generated crystal (NaN allowed).
      ref_values: [n_ref] values of every reference crystal.
      valid: [n_gen] validity mask.
      n_draw: samples per draw.
      seeds: one draw per seed.

    Returns:
      {"all_valid", "mean", "std", "values", "seeds", "n_draw", "n_valid", "note"}.
    """
    v = np.asarray(sample_values, np.float64)[np.asarray(valid, bool)]
    ref = np.asarray(ref_values, np.float64)
    ref = ref[np.isfinite(ref)]
    out: dict[str, Any] = {
        "all_valid": emd(v[np.isfinite(v)], ref),
        "n_valid": len(v),
        "n_draw": n_draw,
        "seeds": list(seeds),
    }
    values = []
    for seed in seeds:
        idx = draw_indices(len(v), n_draw, seed)
        if idx is None:
            break
        drawn = v[idx]
        values.append(emd(drawn[np.isfinite(drawn)], ref))
    if values:
        out.update(
            mean=float(np.mean(values)), std=float(np.std(values, ddof=0)), values=values, note=""
        )
    else:
        out.update(
            mean=float("nan"),
            std=float("nan"),
            values=[],
            note=f"fewer valid samples ({len(v)}) than the draw size ({n_draw}); "
            "CDVAE refuses this case: only the all-valid EMD is reported",
        )
    return out


# =================================================================== uniqueness/novelty
def _uniqueness_chunk(groups: list[tuple[list[Crystal], str, dict]]) -> list[list[bool]]:
    """Worker: `DistinctFilter` over each list of same-formula structures (first occurrences)."""
    out = []
    for crystals, formula, tol in groups:
        f = DistinctFilter(tol)
        out.append([f.add(c, formula) for c in crystals])
    return out


def uniqueness(
    crystals: Sequence[Crystal | None],
    formulas: Sequence[str],
    mask: np.ndarray | None = None,
    tolerances: Mapping[str, float] = NOVELTY_MATCHER,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Share of distinct structures among the considered samples.

    Rule: samples are grouped by reduced formula (structures of different reduced formula
    never match); within a group, in sample order, a sample joins the first earlier
    distinct structure that pymatgen ``StructureMatcher(**tolerances).fit`` matches, else
    it starts a new one (`autoperi_jax.distinct.DistinctFilter`, which ``autoperi sample
    --unique`` filters with). ``uniqueness = n_distinct / n_considered``; the first occurrence
    of each structure counts as unique, so k copies of one structure add 1 / k.

    Args:
      crystals: samples.
      formulas: [n] reduced formulas (`Features.formula`).
      mask: [n] samples to consider (default: every constructed one).
      tolerances: matcher tolerances (default pymatgen's, `NOVELTY_MATCHER`).
      workers: processes.
      progress: progress bar.

    Returns:
      {"uniqueness", "n_unique", "n", "is_first": [n] bool (first of its structure)}.
    """
    n = len(crystals)
    mask = np.array([c is not None for c in crystals]) if mask is None else np.asarray(mask)
    by_formula: dict[str, list[int]] = defaultdict(list)
    for i in np.flatnonzero(mask):
        by_formula[formulas[i]].append(int(i))
    multi = [(f, idx) for f, idx in by_formula.items() if len(idx) > 1]
    firsts = parallel_map(
        _uniqueness_chunk, [([crystals[i] for i in idx], f, dict(tolerances)) for f, idx in multi],
        workers=workers, chunk_size=8, desc="uniqueness",
        progress=progress and bool(multi), unit="formula",
    )  # fmt: skip
    is_first = np.zeros(n, bool)
    for idx in by_formula.values():
        is_first[idx[0]] = True  # the first of a formula is always distinct
    for (_, idx), first in zip(multi, firsts):
        is_first[idx] = first
    n_considered = int(mask.sum())
    n_unique = int(is_first.sum())
    return {
        "uniqueness": n_unique / n_considered if n_considered else 0.0,
        "n_unique": n_unique,
        "n": n_considered,
        "is_first": is_first,
    }


def _novelty_chunk(items: list[tuple[Crystal, list[Crystal], dict]]) -> list[bool]:
    out = []
    for c, train, tol in items:
        m = matcher(tol)
        s = c.to_pymatgen()
        out.append(not any(safe_fit(m, s, t.to_pymatgen()) for t in train))
    return out


def novelty(
    crystals: Sequence[Crystal | None],
    formulas: Sequence[str],
    train: Sequence[Crystal],
    train_formulas: Sequence[str],
    mask: np.ndarray | None = None,
    tolerances: Mapping[str, float] = NOVELTY_MATCHER,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Share of considered samples that match no training structure.

    Rule: a sample is novel iff pymatgen ``StructureMatcher(**tolerances).fit`` matches no
    training structure of the same reduced formula (other formulas cannot match).
    ``novelty = n_novel / n_considered``.

    Args:
      crystals, formulas: samples and their reduced formulas.
      train, train_formulas: the training split and its reduced formulas.
      mask: samples to consider (default: every constructed one).
      tolerances: matcher tolerances (recorded in the report).
      workers, progress: parallelism and progress bar.

    Returns:
      {"novelty", "n_novel", "n", "is_novel": [n] bool}.
    """
    n = len(crystals)
    mask = np.array([c is not None for c in crystals]) if mask is None else np.asarray(mask)
    train_by_formula: dict[str, list[Crystal]] = defaultdict(list)
    for t, f in zip(train, train_formulas):
        train_by_formula[f].append(t)
    is_novel = np.zeros(n, bool)
    todo = []
    for i in np.flatnonzero(mask):
        cands = train_by_formula.get(formulas[i], [])
        if cands:
            todo.append((int(i), (crystals[i], cands, dict(tolerances))))
        else:
            is_novel[i] = True
    res = parallel_map(
        _novelty_chunk, [t[1] for t in todo], workers=workers, chunk_size=64, desc="novelty",
        progress=progress and bool(todo), unit="structure",
    )  # fmt: skip
    for (i, _), r in zip(todo, res):
        is_novel[i] = r
    n_considered = int(mask.sum())
    n_novel = int((is_novel & mask).sum())
    return {
        "novelty": n_novel / n_considered if n_considered else 0.0,
        "n_novel": n_novel,
        "n": n_considered,
        "is_novel": is_novel,
    }


# ==================================================================== reconstruction
def reconstruction_metrics(
    preds: Sequence[Crystal | None],
    refs: Sequence[Crystal],
    pred_valid: np.ndarray,
    ref_valid: np.ndarray,
    tolerances: Mapping[str, float] = CDVAE_MATCHER,
    require_reference_valid: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Match rate and RMSE: CDVAE ``RecEval.get_match_rate_and_rms``
    (`autoperi_jax.matching.match_rms` / `match_summary`, on a process pool).

    Rule: for each reference crystal i with a VALID prediction, ``rms =
    StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3).get_rms_dist(pred_i, ref_i)``
    (None if they do not match or the matcher raises). ``match_rate`` = number of matches
    / number of reference crystals; ``rmse`` = mean of ``rms[0]`` (RMS displacement
    normalised by ``(V / n_atoms)^(1/3)``) over the matches.

    ``match_rate_ceiling`` = share of VALID reference crystals: a perfect autoencoder
    reproduces the references, and only valid predictions count. DiffCSP's variant also
    requires the reference to be valid (``require_reference_valid=True``).

    Args:
      preds: [n] predictions aligned with ``refs`` (None = missing / unreadable).
      refs: [n] reference crystals.
      pred_valid, ref_valid: [n] validity masks.
      tolerances: matcher tolerances (CDVAE's by default).
      require_reference_valid: DiffCSP's stricter rule.
      workers, progress: parallelism and progress bar.

    Returns:
      {"match_rate", "rmse", "match_rate_ceiling", "n", "n_matched", "rms": [n] (NaN
      where unmatched)}.
    """
    n = len(refs)
    use = np.asarray(pred_valid, bool).copy()
    if require_reference_valid:
        use &= np.asarray(ref_valid, bool)

    def map_chunks(fn, items):
        return parallel_map(
            fn, items, workers=workers, chunk_size=64, desc="matching", progress=progress,
            unit="pair",
        )  # fmt: skip

    rms = match_rms(preds, refs, tolerances, use, map_chunks)
    summary = match_summary(rms)
    return {
        "match_rate": summary["match_rate"],
        "rmse": summary["rmse"],
        "match_rate_ceiling": float(np.mean(ref_valid)) if n else 0.0,
        "n": n,
        "n_matched": summary["n_matched"],
        "rms": rms,
    }


def lattice_mae(
    pred_lattice: np.ndarray, ref_lattice: np.ndarray, mask: np.ndarray | None = None
) -> dict[str, float]:
    """Mean absolute error of lattice parameters over aligned pairs.

    Rule: ``mean(|pred - ref|)`` per parameter over the pairs in ``mask`` (default: pairs
    where both are finite); a, b, c in A, alpha, beta, gamma in degrees. The caller picks
    the cell setting (the report uses Niggli-reduced cells of both, so a different but
    equivalent cell choice is not counted as an error).

    Returns:
      {"a", "b", "c", "alpha", "beta", "gamma", "lengths", "angles", "n"}.
    """
    p, r = np.asarray(pred_lattice, np.float64), np.asarray(ref_lattice, np.float64)
    ok = np.isfinite(p).all(1) & np.isfinite(r).all(1)
    if mask is not None:
        ok &= np.asarray(mask, bool)
    err = np.abs(p[ok] - r[ok])
    names = ("a", "b", "c", "alpha", "beta", "gamma")
    if not ok.any():
        return {**{k: float("nan") for k in names}, "lengths": float("nan"),
                "angles": float("nan"), "n": 0}  # fmt: skip
    out = {k: float(v) for k, v in zip(names, err.mean(0))}
    out["lengths"] = float(err[:, :3].mean())
    out["angles"] = float(err[:, 3:].mean())
    out["n"] = int(ok.sum())
    return out


def spacegroup_preserved(
    pred_sg: np.ndarray, ref_sg: np.ndarray, pred_constructed: np.ndarray
) -> dict[str, float]:
    """Share of reference crystals whose prediction has the same spglib space group.

    Rule: spglib international number at the report's ``symprec`` (0.1 A) for prediction
    and reference; a pair counts iff the prediction was constructed and the numbers are
    equal; the denominator is every reference crystal.
    """
    pred_sg, ref_sg = np.asarray(pred_sg), np.asarray(ref_sg)
    same = np.asarray(pred_constructed, bool) & (pred_sg == ref_sg)
    n = len(ref_sg)
    return {"spacegroup_preserved": float(same.mean()) if n else 0.0, "n": n}


# ========================================================================= other stats
def spacegroup_distribution(
    sample_sg: np.ndarray, ref_sg: np.ndarray | None = None, top: int = 20
) -> dict[str, Any]:
    """Space-group frequencies of the samples (and reference), and their distance.

    Rule: frequencies of spglib international numbers (0 = spglib found none) as fractions;
    ``total_variation`` = 0.5 * sum |p_sample - p_ref| over all space groups (0 identical,
    1 disjoint).

    Returns:
      {"samples": {sg: share} (top ``top``), "reference": {...}, "total_variation",
      "n_distinct_samples", "n_distinct_reference"}.
    """

    def freq(x):
        x = np.asarray(x)
        cnt = Counter(int(v) for v in x)
        return {k: v / len(x) for k, v in cnt.items()} if len(x) else {}

    ps = freq(sample_sg)
    out: dict[str, Any] = {
        "samples": {str(k): v for k, v in sorted(ps.items(), key=lambda kv: -kv[1])[:top]},
        "n_distinct_samples": len(ps),
    }
    if ref_sg is not None:
        pr = freq(ref_sg)
        keys = set(ps) | set(pr)
        out["reference"] = {str(k): v for k, v in sorted(pr.items(), key=lambda kv: -kv[1])[:top]}
        out["n_distinct_reference"] = len(pr)
        out["total_variation"] = 0.5 * sum(abs(ps.get(k, 0.0) - pr.get(k, 0.0)) for k in keys)
    return out


def time_per_valid_structure(total_time_s: float | None, n_valid: int) -> float | None:
    """Wall time spent generating the samples divided by the number of VALID samples
    (None without timings; inf if nothing is valid)."""
    if total_time_s is None:
        return None
    return float(total_time_s) / n_valid if n_valid else float("inf")


def stability_rate(
    crystals: Sequence[Crystal | None],
    is_stable: Callable[[Crystal], bool],
    mask: np.ndarray | None = None,
) -> dict[str, float | int]:
    """Hook for physics-based rates (e.g. ``phonon_stable_rate``): share of the considered
    samples for which ``is_stable(crystal)`` is true.

    Args:
      crystals: samples.
      is_stable: callable judging one crystal (e.g. from ``autoperi_jax.physics``).
      mask: samples to consider (default: every constructed one); the denominator.
    """
    mask = np.array([c is not None for c in crystals]) if mask is None else np.asarray(mask)
    idx = np.flatnonzero(mask)
    hits = sum(bool(is_stable(crystals[i])) for i in idx)
    return {"rate": hits / len(idx) if len(idx) else 0.0, "n_stable": hits, "n": len(idx)}


def conditional_metrics(
    values: np.ndarray,
    targets: np.ndarray,
    valid: np.ndarray,
    tolerance: float | None = None,
) -> dict[str, float | int]:
    """Property targeting of conditionally generated samples.

    Rule: over valid samples that have both a property value (precomputed: by a
    property model, DFT, or the physics module) and a target: ``property_mae`` =
    mean |value - target|; ``property_hit_rate`` = share with |value - target| <=
    ``tolerance`` (denominator: every valid sample, so samples without a value count as
    misses).
    """
    v, t = np.asarray(values, np.float64), np.asarray(targets, np.float64)
    valid = np.asarray(valid, bool)
    ok = valid & np.isfinite(v) & np.isfinite(t)
    out: dict[str, float | int] = {
        "property_mae": float(np.abs(v[ok] - t[ok]).mean()) if ok.any() else float("nan"),
        "n_with_value": int(ok.sum()),
    }
    if tolerance is not None:
        hits = ok & (np.abs(np.where(ok, v - t, np.inf)) <= tolerance)
        out["property_hit_rate"] = float(hits.sum() / valid.sum()) if valid.any() else 0.0
    return out
