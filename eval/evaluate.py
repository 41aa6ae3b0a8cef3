"""Runs the metrics of `eval.metrics` for one task: reconstruction, generation, conditional.

`evaluate` takes already-loaded `StructureSet` objects (see `eval.samples`) and an
`EvalOptions` that records every protocol choice; the result carries the metrics, the
per-seed details and the per-structure features the report plots.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np

from eval import csp as C
from eval import metrics as M
from eval.fingerprints import cdvae_comp_scale
from eval.reference import ReferenceStats, fingerprints, reference_side
from eval.samples import StructureSet

__all__ = [
    "EvalOptions",
    "EvalResult",
    "StabilityInputs",
    "align_predictions",
    "evaluate",
    "seeded_subset",
]

TASKS = ("recon", "gen", "cond", "csp")


@dataclasses.dataclass
class EvalOptions:
    """Every protocol choice of an evaluation; written to metrics.json as is.

    Attributes:
      task: ``recon`` (reconstruction), ``gen`` (unconditional generation), ``cond``
        (conditional generation: ``gen`` plus property / space-group targeting) or ``csp``
        (structure prediction from the composition, DiffCSP's protocol: `eval.csp`).
      dataset_name: selects the coverage cut-offs (`metrics.COV_CUTOFFS`).
      struct_cutoff, comp_cutoff: coverage cut-offs; default from ``dataset_name``.
      match_tolerances: StructureMatcher tolerances for reconstruction (CDVAE's).
      novelty_tolerances: StructureMatcher tolerances for uniqueness and novelty.
      symprec: spglib tolerance (A) for every space group.
      min_distance, min_volume: structural-validity cut-offs (A, A^3).
      n_draw: samples per EMD draw (CDVAE: 1,000).
      num_seeds, first_seed: EMD draws use seeds first_seed .. first_seed + num_seeds - 1.
      fingerprint_validity: a failing CrystalNN fingerprint makes a crystal invalid (CDVAE).
      require_reference_valid: reconstruction counts a pair only if the reference is valid
        too (DiffCSP's variant; CDVAE: False).
      lattice_cell: ``niggli`` compares Niggli-reduced cells in lattice_mae, ``as_given``
        the cells as written.
      unique_novel_on: samples considered for uniqueness / novelty: ``valid`` or
        ``constructed``.
      uniqueness: compute uniqueness (and, with a train split, the unique-and-novel
        share). False for one-element data such as Carbon-24: every sample has the same
        reduced formula, so the greedy matcher compares each with every distinct one
        before it (CDVAE's Carbon-24 protocol reports validity, coverage and EMDs only).
      novelty_distance: with a train split, also the mean fingerprint distance of the
        samples to their nearest training crystal (``novelty_distance_struct`` /
        ``_comp``). It fingerprints the whole train split (about 25 CPU-minutes for
        MP-20's 15,455 crystals); novelty itself needs no fingerprints.
      property: property name for the property EMD (values read from the samples' and the
        reference's files).
      property_source: where the property values come from (recorded, not interpreted).
      target, tolerance: conditional task: target property value (else per-sample
        ``target_<property>``) and hit tolerance.
      sampling_time_s: wall time spent generating the samples (for time per valid sample).
      phonons: also compute ``phonon_stable_rate`` (`eval.stability`: pair-potential
        relaxation + phonons) on the valid samples and, as its reference, on the valid
        reference crystals (``phonon_stable_rate_reference``).
      phonon_max: evaluate the phonons of at most this many valid structures per side
        (the first ones; ``None`` = all).
      csp_ks: csp: the k of the match rates (k predictions per test crystal).
      stability: gen/cond: ``"chgnet"`` runs the MLIP stability judge (`eval.mlip`) on the
        valid samples (or a seeded subset) and on as many valid reference crystals scored
        the same way; ``None``: off.
      stability_samples: judge a seeded random subset of this many valid samples (``None``:
        all); the reference side judges as many.
      stability_seed: seed of both subsets (``numpy.random.default_rng``).
      stability_fmax, stability_max_steps: relaxation threshold [eV/A] and step cap.
      stability_threshold: E_hull of "stable" [eV/atom].
      stability_energy_quantile: the hull-free figure ``stability_eform_below_rate``: share
        with a CHGNet formation energy per atom at or below this quantile of the judged
        reference crystals' (0.9).
    """

    task: str = "gen"
    dataset_name: str | None = None
    struct_cutoff: float | None = None
    comp_cutoff: float | None = None
    match_tolerances: dict[str, float] = dataclasses.field(
        default_factory=lambda: dict(M.CDVAE_MATCHER)
    )
    novelty_tolerances: dict[str, float] = dataclasses.field(
        default_factory=lambda: dict(M.NOVELTY_MATCHER)
    )
    symprec: float = 0.1
    min_distance: float = 0.5
    min_volume: float = 0.1
    n_draw: int = 1000
    num_seeds: int = 10
    first_seed: int = 0
    fingerprint_validity: bool = True
    require_reference_valid: bool = False
    lattice_cell: str = "niggli"
    unique_novel_on: str = "valid"
    novelty_distance: bool = True
    uniqueness: bool = True
    property: str | None = None
    property_source: str = "values stored with the samples and with the reference set"
    target: float | None = None
    tolerance: float | None = None
    sampling_time_s: float | None = None
    phonons: bool = False
    phonon_max: int | None = None
    csp_ks: tuple[int, ...] = (1, 20)
    stability: str | None = None
    stability_samples: int | None = None
    stability_seed: int = 0
    stability_fmax: float = 0.05
    stability_max_steps: int = 500
    stability_threshold: float = 0.1
    stability_energy_quantile: float = 0.9

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.lattice_cell not in ("niggli", "as_given"):
            raise ValueError("lattice_cell must be 'niggli' or 'as_given'")
        if not self.csp_ks or min(self.csp_ks) < 1:
            raise ValueError(f"csp_ks must be positive integers, got {self.csp_ks}")
        if self.unique_novel_on not in ("valid", "constructed"):
            raise ValueError("unique_novel_on must be 'valid' or 'constructed'")
        if self.stability not in (None, "chgnet"):
            raise ValueError(f"stability must be None or 'chgnet', got {self.stability!r}")
        if self.stability_samples is not None and self.stability_samples < 1:
            raise ValueError("stability_samples must be >= 1")
        cut = M.COV_CUTOFFS.get(self.dataset_name or "")
        if cut is not None:
            if self.struct_cutoff is None:
                self.struct_cutoff = cut[0]
            if self.comp_cutoff is None:
                self.comp_cutoff = cut[1]

    def seeds(self) -> list[int]:
        """The EMD draw seeds."""
        return list(range(self.first_seed, self.first_seed + self.num_seeds))


@dataclasses.dataclass
class StabilityInputs:
    """What the MLIP stability judge needs besides `EvalOptions` (not protocol choices).

    Attributes:
      hull: `eval.mlip.FormationHull` for E_hull / stable_rate / S.U.N. (``None``: skip).
      reference: the reference split's structures when ``reference`` is shipped
        statistics (``None``: use the reference passed to `evaluate`).
      train: training structures for the S.U.N. novelty (default: ``train``'s).
      train_note: what ``train`` is (written to metrics.json).
      workers: relaxation processes (default min(cores, 4); 0 = in this process).
      cache: JSON-lines cache of relaxations (default `eval.mlip.default_cache_path`).
    """

    hull: Any = None
    reference: StructureSet | None = None
    train: list | None = None
    train_note: str | None = None
    workers: int | None = None
    cache: str | None = None


@dataclasses.dataclass
class EvalResult:
    """Metrics plus what the report needs to draw them."""

    options: EvalOptions
    metrics: dict[str, Any]
    details: dict[str, Any]
    samples: StructureSet
    reference: StructureSet | ReferenceStats
    sample_features: M.Features
    reference_features: M.Features
    sample_valid: np.ndarray
    reference_valid: np.ndarray
    sample_property: np.ndarray | None = None
    reference_property: np.ndarray | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


class _Timer:
    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.t[name] = timer.t.get(name, 0.0) + time.perf_counter() - self.start

        return _Ctx()


def align_predictions(preds: StructureSet, refs: StructureSet) -> tuple[StructureSet, str, int]:
    """Aligns reconstruction predictions with references.

    By name when every name on both sides is unique and the prediction names are a
    subset of the reference names (missing predictions become ``None``: unmatched); else
    by order, which needs equal lengths.

    Returns:
      (predictions in reference order, "name" or "order", number of missing predictions).
    """
    pn, rn = preds.names, refs.names
    if len(set(pn)) == len(pn) and len(set(rn)) == len(rn) and set(pn) <= set(rn):
        where = {n: i for i, n in enumerate(pn)}
        crystals = [preds.crystals[where[n]] if n in where else None for n in rn]
        errors = [
            preds.errors[where[n]] if n in where else "no prediction with this name" for n in rn
        ]
        aligned = StructureSet(crystals, list(rn), errors, preds.source)
        return aligned, "name", len(rn) - len(pn)
    if len(pn) != len(rn):
        raise ValueError(
            f"cannot align {len(pn)} predictions with {len(rn)} references: the names do not "
            "match (or are not unique) and the counts differ"
        )
    return preds, "order", 0


def _valid_mask(f: M.Features, fp_ok: np.ndarray | None, opts: EvalOptions) -> np.ndarray:
    valid = f.comp_valid & f.struct_valid
    if opts.fingerprint_validity and fp_ok is not None:
        valid = valid & fp_ok
    return valid


def _finite(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if np.isfinite(x) else None


def evaluate(
    samples: StructureSet,
    reference: StructureSet | ReferenceStats,
    options: EvalOptions,
    train: StructureSet | None = None,
    workers: int | None = None,
    cache_dir: str | None = None,
    use_cache: bool = True,
    progress: bool = True,
    stability: StabilityInputs | None = None,
) -> EvalResult:
    """Evaluates samples against a reference set with the CDVAE protocol.

    Args:
      samples: generated (``gen`` / ``cond``) or reconstructed (``recon``) structures.
      reference: test split (``gen``: coverage / EMD reference, its structures or its
        `eval.reference.ReferenceStats`; ``recon``: ground truth, structures only).
      options: the protocol (`EvalOptions`).
      train: training split for novelty (optional).
      workers: processes (default: every core).
      cache_dir: fingerprint cache folder.
      use_cache: read / write the fingerprint cache.
      progress: progress bars.
      stability: what the MLIP judge needs besides the options (``options.stability``).
    """
    if options.task in ("recon", "csp"):
        if isinstance(reference, ReferenceStats):
            raise ValueError(f"{options.task} compares structures: pass the reference split")
        fn = _evaluate_recon if options.task == "recon" else _evaluate_csp
        return fn(samples, reference, options, workers, cache_dir, use_cache, progress)
    return _evaluate_gen(
        samples, reference, options, train, workers, cache_dir, use_cache, progress,
        stability or StabilityInputs(),
    )  # fmt: skip


def _fps(ss: StructureSet, workers, cache_dir, use_cache, progress, comp: bool = True):
    fp = fingerprints(ss, workers, cache_dir, use_cache, progress, comp)
    return fp.struct, fp.struct_ok, fp.comp, fp.comp_ok


def _evaluate_gen(
    samples, reference, opts, train, workers, cache_dir, use_cache, progress, stab_in
):
    timer = _Timer()
    feat_kw = dict(
        symprec=opts.symprec, min_distance=opts.min_distance, min_volume=opts.min_volume,
        workers=workers, progress=progress,
    )  # fmt: skip
    with timer("features"):
        sf = M.compute_features(samples.crystals, desc="samples: validity", **feat_kw)
    with timer("fingerprints"):
        s_sfp, s_sok, s_cfp, s_cok = _fps(samples, workers, cache_dir, use_cache, progress)
    with timer("reference"):  # stored statistics, or computed from the structures
        rf, rfp = reference_side(
            reference, opts.symprec, opts.min_distance, opts.min_volume, workers, cache_dir,
            use_cache, progress,
        )  # fmt: skip
        r_sfp, r_sok, r_cfp, r_cok = rfp.struct, rfp.struct_ok, rfp.comp, rfp.comp_ok
    fp_ok = s_sok & s_cok
    valid = _valid_mask(sf, fp_ok, opts)
    ref_valid = _valid_mask(rf, r_sok & r_cok, opts)
    metrics: dict[str, Any] = {}
    details: dict[str, Any] = {}
    v = M.validity_rates(sf, fp_ok if opts.fingerprint_validity else None)
    metrics.update(
        struct_validity=v["struct_validity"],
        comp_validity=v["comp_validity"],
        validity=v["validity"],
        n_samples=len(samples),
        n_valid=v["n_valid"],
        n_unreadable=samples.n_unreadable,
        n_fingerprint_failed=int((~fp_ok).sum()),
        n_reference=len(reference),
        reference_comp_validity=float(rf.comp_valid.mean()),
        reference_struct_validity=float(rf.struct_valid.mean()),
        reference_validity=float(ref_valid.mean()),
    )
    details["reference_comp_invalid"] = [reference.names[i] for i in np.flatnonzero(~rf.comp_valid)]

    # Coverage over all generated crystals (CDVAE compute_cov; see metrics.coverage).
    with timer("coverage"):
        if opts.struct_cutoff is not None and opts.comp_cutoff is not None:
            ref_fp_ok = r_sok & r_cok
            if not ref_fp_ok.all():
                details["reference_fingerprint_failed"] = [
                    reference.names[i] for i in np.flatnonzero(~ref_fp_ok)
                ]
            cov, near_s, near_c = M.coverage(
                s_sfp, s_cfp, r_sfp[ref_fp_ok], r_cfp[ref_fp_ok], opts.struct_cutoff,
                opts.comp_cutoff, sample_ok=fp_ok, num_generated=len(samples),
                return_nearest=True,
            )  # fmt: skip
            metrics.update(cov)
            # the reference crystals no sample covers, with how far the nearest ones are
            names = [reference.names[i] for i in np.flatnonzero(ref_fp_ok)]
            miss = np.flatnonzero((near_s > opts.struct_cutoff) | (near_c > opts.comp_cutoff))
            details["cov_recall_misses"] = [
                {"name": names[i], "struct_distance": float(near_s[i]),
                 "comp_distance": float(near_c[i])}
                for i in miss
            ]  # fmt: skip
        else:
            details["coverage_note"] = (
                "coverage skipped: no cut-offs (pass --dataset-name mp_20|perov_5|carbon_24 or "
                "--struct-cutoff/--comp-cutoff)"
            )

    # EMDs: drawn valid samples vs every reference crystal (CDVAE GenEval).
    with timer("emd"):
        emds = {
            "density": M.emd_report(sf.density, rf.density, valid, opts.n_draw, opts.seeds()),
            "num_elements": M.emd_report(
                sf.n_elements.astype(float), rf.n_elements.astype(float), valid, opts.n_draw,
                opts.seeds(),
            ),
        }  # fmt: skip
        s_prop = r_prop = None
        if opts.property:
            if samples.has_property(opts.property) and reference.has_property(opts.property):
                s_prop = samples.property_values(opts.property)
                r_prop = reference.property_values(opts.property)
                emds["property"] = M.emd_report(s_prop, r_prop, valid, opts.n_draw, opts.seeds())
            else:
                details["property_note"] = (
                    f"property {opts.property!r} is missing from the samples or the reference; "
                    "property EMD not computed (pass values predicted by a property model)"
                )
        for k, e in emds.items():
            metrics[f"emd_{k}"] = _finite(e["mean"])
            metrics[f"emd_{k}_std"] = _finite(e["std"])
            metrics[f"emd_{k}_all_valid"] = _finite(e["all_valid"])
        details["emd"] = emds

        # CDVAE's diversity on the same draws.
        vidx = np.flatnonzero(valid)
        sdiv, cdiv = [], []
        for seed in opts.seeds():
            idx = M.draw_indices(len(vidx), opts.n_draw, seed)
            if idx is None:
                break
            sel = vidx[idx]
            sdiv.append(M.fingerprint_diversity(s_sfp[sel]))
            cdiv.append(M.fingerprint_diversity(cdvae_comp_scale(s_cfp[sel])))
        metrics["struct_diversity"] = _finite(np.mean(sdiv)) if sdiv else None
        metrics["comp_diversity"] = _finite(np.mean(cdiv)) if cdiv else None

    # Uniqueness / novelty.
    considered = valid if opts.unique_novel_on == "valid" else sf.constructed
    u = None
    if opts.uniqueness:
        with timer("uniqueness"):
            u = M.uniqueness(
                samples.crystals, sf.formula, considered, opts.novelty_tolerances, workers,
                progress,
            )  # fmt: skip
            metrics["uniqueness"] = u["uniqueness"]
    if train is not None:
        with timer("novelty"):
            tcrys = [c for c in train.crystals if c is not None]
            tform = [M.reduced_formula(c) for c in tcrys]
            nv = M.novelty(
                samples.crystals, sf.formula, tcrys, tform, considered,
                opts.novelty_tolerances, workers, progress,
            )  # fmt: skip
            metrics["novelty"] = nv["novelty"]
            if u is not None:
                un = considered & u["is_first"] & nv["is_novel"]
                metrics["unique_novel_rate"] = (
                    float(un.sum() / considered.sum()) if considered.any() else 0.0
                )
            # P1 (no symmetry found by spglib at opts.symprec) among the novel samples: the
            # field's generators put 25-48 % of their novel MP-20 samples there, the data 1.5 %
            novel = considered & nv["is_novel"]
            metrics["novel_p1_share"] = (
                float(np.mean(sf.spacegroup[novel] == 1)) if novel.any() else None
            )
            metrics["n_train"] = len(train)
        if opts.novelty_distance:
            t_sfp, t_sok, t_cfp, t_cok = _fps(train, workers, cache_dir, use_cache, progress)
            sel = np.flatnonzero(considered & fp_ok)
            t_use = t_sok & t_cok
            d_s, _ = M.nearest_distance(s_sfp[sel], t_sfp[t_use])
            d_c, _ = M.nearest_distance(
                cdvae_comp_scale(s_cfp[sel]), cdvae_comp_scale(t_cfp[t_use])
            )
            metrics["novelty_distance_struct"] = _finite(d_s.mean()) if len(sel) else None
            metrics["novelty_distance_comp"] = _finite(d_c.mean()) if len(sel) else None

    if opts.phonons:
        from eval.stability import StabilityOptions, phonon_stability

        if isinstance(reference, ReferenceStats):
            raise ValueError(
                "--phonons relaxes the reference crystals, which statistics do not hold; pass "
                "--no-reference-stats (reads the split's structures)"
            )

        with timer("phonons"):
            sopts = StabilityOptions()
            for side, structs, ok in (
                ("", samples.crystals, valid),
                ("_reference", reference.crystals, ref_valid),
            ):
                sel = np.asarray(ok, bool).copy()
                if opts.phonon_max is not None:
                    sel[np.flatnonzero(sel)[opts.phonon_max :]] = False
                st = phonon_stability(structs, sel, sopts, progress)
                metrics[f"phonon_stable_rate{side}"] = _finite(st["phonon_stable_rate"])
                details[f"phonons{side}"] = {
                    "n_evaluated": int(st["n_evaluated"]),
                    "relax_converged_rate": _finite(st["relax_converged_rate"]),
                }
            details["phonon_options"] = dataclasses.asdict(sopts)

    if opts.stability:
        with timer("stability"):
            sm, sd = _stability(samples, valid, reference, ref_valid, train, opts, stab_in,
                                progress)  # fmt: skip
        metrics.update(sm)
        details.update(sd)

    sg = M.spacegroup_distribution(sf.spacegroup[valid], rf.spacegroup)
    metrics["spacegroup_total_variation"] = sg.get("total_variation")
    details["spacegroup_distribution"] = sg

    total = opts.sampling_time_s
    if total is None and samples.has_property("sampling_time_s"):
        t = samples.property_values("sampling_time_s")
        total = float(np.nansum(t))
        details["sampling_time_note"] = "sum of the samples' 'sampling_time_s' values"
    metrics["time_per_valid_structure_s"] = _finite(
        M.time_per_valid_structure(total, int(valid.sum()))
    )

    if opts.task == "cond":
        cond: dict[str, Any] = {}
        if opts.property and s_prop is not None:
            if opts.target is not None:
                targets = np.full(len(samples), float(opts.target))
            else:
                targets = samples.property_values(f"target_{opts.property}")
            cond.update(M.conditional_metrics(s_prop, targets, valid, opts.tolerance))
        if samples.has_property("target_spacegroup"):
            tsg = samples.property_values("target_spacegroup")
            ok = valid & np.isfinite(tsg)
            cond["spacegroup_target_rate"] = (
                float((sf.spacegroup[ok] == tsg[ok]).sum() / valid.sum()) if valid.any() else 0.0
            )
        if not cond:
            details["cond_note"] = (
                "no conditional targets found: give --property with --target, or per-sample "
                "'target_<property>' / 'target_spacegroup' values"
            )
        metrics.update(cond)

    return EvalResult(
        options=opts, metrics=metrics, details=details, samples=samples, reference=reference,
        sample_features=sf, reference_features=rf, sample_valid=valid, reference_valid=ref_valid,
        sample_property=s_prop, reference_property=r_prop, timings=timer.t,
    )  # fmt: skip


def seeded_subset(mask: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Indices of ``n`` entries drawn without replacement from ``mask`` with
    ``numpy.random.default_rng(seed)``, in ascending order (all of them if ``n`` is None or
    not smaller)."""
    idx = np.flatnonzero(np.asarray(mask, bool))
    if n is None or n >= len(idx):
        return idx
    return np.sort(np.random.default_rng(seed).choice(idx, size=n, replace=False))


def _stability(samples, valid, reference, ref_valid, train, opts, stab_in, progress):
    """The MLIP judge on a seeded subset of valid samples and as many valid reference
    crystals (`eval.mlip`)."""
    from eval import mlip

    settings = mlip.RelaxSettings(fmax=opts.stability_fmax, max_steps=opts.stability_max_steps)
    cache = mlip.RelaxCache(stab_in.cache or mlip.default_cache_path(settings))
    workers = stab_in.workers if stab_in.workers is not None else min(os.cpu_count() or 1, 4)
    hull = stab_in.hull
    tcrys = stab_in.train or ([c for c in train.crystals if c is not None] if train else None)
    details: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    sel = seeded_subset(valid, opts.stability_samples, opts.stability_seed)
    run = dict(settings=settings, workers=workers, cache=cache, progress=progress)

    ref_set = stab_in.reference if stab_in.reference is not None else reference
    ref_recs = None
    t_ref = 0.0
    if isinstance(ref_set, ReferenceStats):
        details["stability_reference_note"] = (
            "the reference side of the stability judge needs the reference split's "
            "structures: shipped statistics hold none (put the split in --data-dir / "
            "$AUTOPERI_DATA, or pass --no-reference-stats); sample figures have no baseline"
        )
    else:
        rv = (
            ref_valid
            if len(ref_valid) == len(ref_set)
            else np.array([c is not None for c in ref_set.crystals])
        )
        rsel = seeded_subset(rv, len(sel), opts.stability_seed)
        t0 = time.perf_counter()
        ref_recs = mlip.relax_structures(
            [ref_set.crystals[i] for i in rsel], [ref_set.names[i] for i in rsel],
            desc="CHGNet relax: reference", **run,
        )  # fmt: skip
        t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    recs = mlip.relax_structures(
        [samples.crystals[i] for i in sel], [samples.names[i] for i in sel],
        desc="CHGNet relax: samples", **run,
    )  # fmt: skip
    t_smp = time.perf_counter() - t0

    kw = dict(hull=hull, train=tcrys, threshold=opts.stability_threshold,
              workers=stab_in.workers if stab_in.workers else 1, progress=progress)  # fmt: skip
    sm, sa = mlip.summarize(recs, **kw)
    quantiles: dict[str, float] = {}
    if ref_recs is not None:
        rm, ra = mlip.summarize(ref_recs, **kw)
        # a figure with a real-data baseline where no hull says "stable" for real crystals
        # (Perov-5): the share at or below the judged reference crystals' quantile, of
        # E_hull where a hull is given (comparable across compositions) and of the
        # formation energy always
        for name, key in (("ehull", "e_hull"), ("eform", "e_form")):
            if key not in ra or not np.isfinite(ra[key]).any():
                continue
            q = float(np.nanquantile(ra[key], opts.stability_energy_quantile))
            quantiles[name] = q
            sm[f"stability_{name}_below_ref_rate"] = mlip.below_rate(sa[key], q)
            rm[f"stability_{name}_below_ref_rate"] = mlip.below_rate(ra[key], q)
        metrics.update({f"{k}_reference": v for k, v in rm.items()})
    metrics.update(sm)
    keep = ("name", "formula", "ok", "error", "energy_per_atom", "formation_energy_per_atom",
            "steps", "converged", "relaxed_match", "rmsd", "volume_change", "cached")  # fmt: skip

    def rows(rs, arrays):
        out = []
        for j, r in enumerate(rs):
            row = {k: r.get(k) for k in keep}
            for a in ("e_hull", "unique", "novel"):
                if a in arrays:
                    row[a] = arrays[a][j]
            out.append(row)
        return out

    details["stability"] = {
        "protocol": mlip.protocol(settings, hull, opts.stability_threshold)
        | {
            "subset": f"seeded random subset (numpy default_rng({opts.stability_seed})) of "
            f"{len(sel)} of {int(np.sum(valid))} valid samples; the reference side draws as "
            "many valid reference crystals with the same seed",
            "below_ref_rate": {
                name: f"share with {'E_hull' if name == 'ehull' else 'a formation energy'} "
                f"per atom <= {q:.4f} eV/atom, the {opts.stability_energy_quantile:g} "
                "quantile of the judged reference crystals' (so the reference scores about "
                f"{opts.stability_energy_quantile:g} by construction)"
                for name, q in quantiles.items()
            }
            or None,
            "novelty_train": stab_in.train_note
            or (f"{len(tcrys)} train structures" if tcrys is not None else None),
            "cache": str(cache.path),
        },
        "below_ref_thresholds": quantiles,
        "wall_s": {"samples": t_smp, "reference": t_ref},
        "n_cached": {"samples": sum(bool(r.get("cached")) for r in recs),
                     "reference": sum(bool(r.get("cached")) for r in ref_recs or [])},
        "samples": rows(recs, sa),
        "reference": rows(ref_recs, ra) if ref_recs is not None else None,
    }  # fmt: skip
    if hull is None:
        details["stability_hull_note"] = (
            "no convex hull given: E_hull, stable_rate and sun_rate not computed (the MP-20 "
            "hull needs mp_20/{train_meta_all,val,test}.csv.xz in --data-dir / $AUTOPERI_DATA)"
        )
    return metrics, details


def _paired_validity(preds, refs, opts, timer, workers, cache_dir, use_cache, progress):
    """Features, fingerprint flags and validity masks of predictions and references (recon,
    csp: CDVAE's and DiffCSP's Crystal count a failing fingerprint as invalid)."""
    feat_kw = dict(
        symprec=opts.symprec, min_distance=opts.min_distance, min_volume=opts.min_volume,
        workers=workers, progress=progress,
    )  # fmt: skip
    with timer("features"):
        pf = M.compute_features(preds.crystals, desc="predictions: validity", **feat_kw)
        rf = M.compute_features(refs.crystals, desc="references: validity", **feat_kw)
    p_ok = r_ok = None
    if opts.fingerprint_validity:
        with timer("fingerprints"):
            _, p_ok, _, _ = _fps(preds, workers, cache_dir, use_cache, progress, comp=False)
            _, r_ok, _, _ = _fps(refs, workers, cache_dir, use_cache, progress, comp=False)
    return pf, rf, p_ok, _valid_mask(pf, p_ok, opts), _valid_mask(rf, r_ok, opts)


def _evaluate_recon(preds, refs, opts, workers, cache_dir, use_cache, progress):
    timer = _Timer()
    preds, how, n_missing = align_predictions(preds, refs)
    pf, rf, p_ok, pv, rv = _paired_validity(
        preds, refs, opts, timer, workers, cache_dir, use_cache, progress
    )
    with timer("matching"):
        rec = M.reconstruction_metrics(
            preds.crystals, refs.crystals, pv, rv, opts.match_tolerances,
            opts.require_reference_valid, workers, progress,
        )  # fmt: skip
    lat_p = pf.lattice_niggli if opts.lattice_cell == "niggli" else pf.lattice
    lat_r = rf.lattice_niggli if opts.lattice_cell == "niggli" else rf.lattice
    v = M.validity_rates(pf, p_ok)
    metrics: dict[str, Any] = {
        "match_rate": rec["match_rate"],
        "rmse": _finite(rec["rmse"]),
        "match_rate_ceiling": rec["match_rate_ceiling"],
        "n_reference": len(refs),
        "n_matched": rec["n_matched"],
        "n_missing_predictions": n_missing,
        "alignment": how,
        "pred_struct_validity": v["struct_validity"],
        "pred_comp_validity": v["comp_validity"],
        "pred_validity": v["validity"],
        "reference_validity": float(rv.mean()),
        "lattice_mae": M.lattice_mae(lat_p, lat_r, pf.constructed & rf.constructed),
        "lattice_mae_matched": M.lattice_mae(lat_p, lat_r, np.isfinite(rec["rms"])),
        "spacegroup_preserved": M.spacegroup_preserved(
            pf.spacegroup, rf.spacegroup, pf.constructed
        )["spacegroup_preserved"],
    }
    details = {
        "rms": rec["rms"].tolist(),
        "reference_invalid": [refs.names[i] for i in np.flatnonzero(~rv)],
    }
    return EvalResult(
        options=opts, metrics=metrics, details=details, samples=preds, reference=refs,
        sample_features=pf, reference_features=rf, sample_valid=pv, reference_valid=rv,
        timings=timer.t,
    )  # fmt: skip


def _evaluate_csp(preds, refs, opts, workers, cache_dir, use_cache, progress):
    timer = _Timer()
    groups = C.group_predictions(preds.names, refs.names)
    pf, rf, p_ok, pv, rv = _paired_validity(
        preds, refs, opts, timer, workers, cache_dir, use_cache, progress
    )
    with timer("matching"):
        res = C.csp_metrics(
            preds.crystals, refs.crystals, groups, pv, rv, opts.csp_ks, opts.match_tolerances,
            workers, progress,
        )  # fmt: skip
    with timer("polymorphs"):
        ceil = C.single_answer_ceiling(refs.crystals, rv, opts.match_tolerances, workers, progress)
    kept = [
        preds.crystals[p] is not None
        and sorted(preds.crystals[p].numbers.tolist()) == sorted(refs.crystals[i].numbers.tolist())
        for i, g in enumerate(groups)
        for p in g
    ]
    v = M.validity_rates(pf, p_ok)
    metrics: dict[str, Any] = {k: res[k] for k in res if k != "rms"}
    metrics.update(
        n_predictions=len(preds), composition_kept_rate=float(np.mean(kept)) if kept else 0.0,
        pred_validity=v["validity"], pred_struct_validity=v["struct_validity"],
        pred_comp_validity=v["comp_validity"], reference_validity=float(rv.mean()),
        match_rate_ceiling_k1=ceil["match_rate_ceiling_k1"],
    )  # fmt: skip
    for k in ("rmse_k1", *(f"rmse_k{k}" for k in opts.csp_ks)):
        if k in metrics:
            metrics[k] = _finite(metrics[k])
    details = {
        "rms": res["rms"].tolist(),
        "polymorphs": ceil,
        "reference_invalid": [refs.names[i] for i in np.flatnonzero(~rv)],
        "csp_rule": "DiffCSP compute_metrics.py: k = 1 RecEval (prediction and reference "
        "valid), k > 1 RecEvalBatch (any valid prediction of the first k; best RMS)",
    }
    return EvalResult(
        options=opts, metrics=metrics, details=details, samples=preds, reference=refs,
        sample_features=pf, reference_features=rf, sample_valid=pv, reference_valid=rv,
        timings=timer.t,
    )  # fmt: skip
