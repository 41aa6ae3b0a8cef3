"""The match rate of the CDVAE protocol, in one place (CDVAE ``RecEval``).

`match_rms` gives each (prediction, reference) pair's pymatgen StructureMatcher RMS
distance (NaN where they do not match); `match_summary` the match rate and the RMSE over
the matches. `autoperi_jax.reconstruct.match_metrics` (the trainer's quick check) and
`eval.metrics.reconstruction_metrics` (the evaluation, on a process pool) both use them.
A light module (crystal + pymatgen, no JAX model code): pool workers import it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from autoperi_jax.crystal import Crystal
from autoperi_jax.distinct import matcher

__all__ = ["CONSENSUS_SCALE", "consensus_scores", "match_rms", "match_summary"]

#: ``map_chunks(fn, items) -> results``: applies a function of a list of items to chunks
#: of ``items`` (e.g. on several processes) and returns the flat list of results in order.
MapChunks = Callable[[Callable[[list[Any]], list[Any]], Sequence[Any]], list[Any]]


def _rms_chunk(items: list[tuple[Crystal, Crystal, dict]]) -> list[float | None]:
    """``get_rms_dist(pred, ref)[0]`` per pair, None where they do not match (module-level:
    picklable for a process pool)."""
    out: list[float | None] = []
    for pred, ref, tol in items:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = matcher(tol).get_rms_dist(pred.to_pymatgen(), ref.to_pymatgen())
            out.append(None if r is None else float(r[0]))
        except Exception:  # CDVAE: an exception means no match
            out.append(None)
    return out


def match_rms(
    preds: Sequence[Crystal | None],
    refs: Sequence[Crystal],
    tolerances: Mapping[str, float],
    use: np.ndarray | None = None,
    map_chunks: MapChunks | None = None,
) -> np.ndarray:
    """StructureMatcher RMS distance of every (prediction, reference) pair.

    Rule (CDVAE ``RecEval``): ``StructureMatcher(**tolerances).get_rms_dist(pred, ref)[0]``,
    the RMS displacement normalised by ``(V / n_atoms)^(1/3)``; None (here NaN) when they
    do not match or the matcher raises.

    Args:
      preds: [n] predictions aligned with ``refs`` (None = missing).
      refs: [n] reference crystals.
      tolerances: ``ltol``, ``stol``, ``angle_tol`` (CDVAE: 0.3, 0.5, 10).
      use: [n] bool, the pairs to match (default all); the others are NaN.
      map_chunks: how to map over chunks of pairs (e.g. `autoperi_jax.parallel.parallel_map`);
        default: in this process.

    Returns:
      [n] float64 RMS distances, NaN where unmatched or not used.
    """
    n = len(refs)
    assert len(preds) == n, "predictions and references must be aligned"
    use = np.ones(n, bool) if use is None else np.asarray(use, bool).copy()
    use &= np.array([p is not None for p in preds], bool)
    todo = np.flatnonzero(use)
    items = [(preds[i], refs[i], dict(tolerances)) for i in todo]
    res = _rms_chunk(items) if map_chunks is None else map_chunks(_rms_chunk, items)
    rms = np.full(n, np.nan)
    for i, r in zip(todo, res):
        if r is not None:
            rms[i] = r
    return rms


def match_summary(rms: np.ndarray) -> dict[str, float | int]:
    """Match rate and RMSE of `match_rms` distances (NaN = not matched).

    Returns:
      ``{"match_rate": matches / n (0 for n = 0), "rmse": mean RMS over the matches (NaN
      without any), "n_matched"}``.
    """
    n = len(rms)
    matched = np.isfinite(rms)
    return {
        "match_rate": float(matched.sum() / n) if n else 0.0,
        "rmse": float(rms[matched].mean()) if matched.any() else float("nan"),
        "n_matched": int(matched.sum()),
    }


#: Length scale of `consensus_scores` (normalised RMS), chosen on Perov-5 validation
#: compositions (400 x 8 predictions: 0.02 / 0.05 / 0.1 gave k = 1 match 58.5 / 58.2 /
#: 58.5 %, RMSE 0.097 / 0.090 / 0.091; in the drawn order 55.8 %, 0.114).
CONSENSUS_SCALE = 0.05


def consensus_scores(
    groups: Sequence[Sequence[Crystal]],
    tolerances: Mapping[str, float],
    scale: float = CONSENSUS_SCALE,
    map_chunks: MapChunks | None = None,
) -> list[np.ndarray]:
    """How much the other predictions of a group agree with each one (a medoid score).

    s_i = sum_{j != i} exp(-rms_ij / scale), rms_ij the `match_rms` distance of
    predictions i and j of the same group (a term 0 where they do not match). Ranking a
    composition's draws by s picks the structure the model predicts most often, sharply:
    the mode of its distribution over structures rather than one draw of it.

    Args:
      groups: predictions of each composition (m_g crystals each).
      tolerances: StructureMatcher tolerances (``CDVAE_MATCHER`` for the CSP protocol).
      scale: the RMS length scale.
      map_chunks: as in `match_rms` (the m_g (m_g - 1) / 2 pairs of every group).

    Returns:
      [m_g] float64 scores per group.
    """
    pairs = [
        (g, i, j) for g, grp in enumerate(groups) for i, j in zip(*np.triu_indices(len(grp), 1))
    ]
    rms = match_rms(
        [groups[g][i] for g, i, _ in pairs],
        [groups[g][j] for g, _, j in pairs],
        tolerances,
        map_chunks=map_chunks,
    )
    kernel = np.where(np.isfinite(rms), np.exp(-np.nan_to_num(rms) / scale), 0.0)
    scores = [np.zeros(len(grp)) for grp in groups]
    for (g, i, j), w in zip(pairs, kernel):
        scores[g][i] += w
        scores[g][j] += w
    return scores
