"""The protocol's constants, re-exported from `autoperi_jax.protocol` (their home)."""

from __future__ import annotations

from autoperi_jax.protocol import CDVAE_MATCHER, COV_CUTOFFS, NOVELTY_MATCHER

__all__ = ["CDVAE_MATCHER", "COV_CUTOFFS", "NOVELTY_MATCHER"]
