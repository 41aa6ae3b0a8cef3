"""Evaluation and benchmarks for autoperi-jax: CDVAE-protocol metrics, reports, plots.

Modules:

* `eval.metrics` — the field's metrics with CDVAE's exact definitions (validity, coverage,
  EMDs, match rate / RMSE) and the extras that make them readable (match-rate ceiling,
  seeded EMD spread, uniqueness, novelty, lattice MAE, space-group statistics), plus hooks
  for model- or physics-derived quantities (property EMD, stability rates).
* `eval.fingerprints` — CrystalNN and Magpie fingerprints, in parallel, cached as ``.npz``.
* `eval.samples` — reading samples and references without dropping invalid entries.
* `eval.evaluate` — one task (recon / gen / cond) end to end, with every option recorded.
* `eval.report` — ``metrics.json``, ``report.md`` (beside published numbers) and plots.
* `eval.cli` — the ``autoperi eval`` command.
"""
