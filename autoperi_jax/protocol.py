"""The evaluation protocol's constants: StructureMatcher tolerances and coverage cut-offs.

In the library because the library uses them too (the sampler's ``--unique`` filter,
`autoperi_jax.distinct`, dedups with `NOVELTY_MATCHER`; the trainer's quick match rate
uses `CDVAE_MATCHER`), and train/ and eval/ import the library, never the reverse. A module
without imports, so that building the ``autoperi`` parser (which shows these as option
defaults) reads them without loading the metrics and their dependencies (pymatgen,
jax-md). `eval.protocol` and `eval.metrics` re-export them.
"""

from __future__ import annotations

__all__ = ["CDVAE_MATCHER", "COV_CUTOFFS", "NOVELTY_MATCHER"]

#: CDVAE's reconstruction matcher (compute_metrics.py ``RecEval``).
CDVAE_MATCHER: dict[str, float] = {"stol": 0.5, "angle_tol": 10.0, "ltol": 0.3}
#: pymatgen's default ``StructureMatcher`` tolerances, the usual choice for uniqueness and
#: novelty (DiffCSP / FlowMM / MatterGen); an option everywhere it is used.
NOVELTY_MATCHER: dict[str, float] = {"stol": 0.3, "angle_tol": 5.0, "ltol": 0.2}
#: Coverage cut-offs (structure, composition) from CDVAE compute_metrics.py ``COV_Cutoffs``.
COV_CUTOFFS: dict[str, tuple[float, float]] = {
    "mp_20": (0.4, 10.0),
    "perov_5": (0.2, 4.0),
    "carbon_24": (0.2, 4.0),
}
