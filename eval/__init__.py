"""Evaluation and benchmarks for autoperi-jax: CDVAE-protocol metrics, reports, plots."""
