"""Crystal structure prediction (CSP) metrics: DiffCSP's protocol.

For every test crystal, k structures are predicted for its composition (the atoms of its
cell). DiffCSP ``scripts/compute_metrics.py``:

* k = 1 (``RecEval``): the first prediction counts if it and the test crystal are both valid
  (SMACT composition rule, structure validity, a computable CrystalNN fingerprint); its
  ``StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3).get_rms_dist`` (normalised RMS
  displacement; ``None`` = no match, an exception = no match) decides.
* k > 1 (``RecEvalBatch``): the first k predictions, each counted if it is valid (the test
  crystal's own validity is not asked here); the crystal is matched if any of them matches,
  with the smallest RMS of those that do.
* match rate = matched test crystals / ALL test crystals; RMSE = mean of the best RMS over
  the matched ones.

Predictions name their test crystal: ``info['name']`` (or a CSV ``material_id``) of the
form ``ID#j`` (j = 0, 1, ...: the j-th prediction for the test crystal named ``ID``), as
``autoperi csp --split`` writes them.

`single_answer_ceiling` is the k = 1 figure a perfect one-answer predictor could reach when
one composition has several test structures (polymorphs): it can give each composition one
structure only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from autoperi_jax.crystal import Crystal
from autoperi_jax.matching import match_rms
from autoperi_jax.parallel import parallel_map
from eval import metrics as M

__all__ = ["csp_metrics", "group_predictions", "single_answer_ceiling"]


def group_predictions(pred_names: Sequence[str], ref_names: Sequence[str]) -> list[list[int]]:
    """Indices of each test crystal's predictions, ordered by their ``#j``.

    Raises:
      ValueError: a name without ``#j``, or naming no test crystal.
    """
    index = {n: i for i, n in enumerate(ref_names)}
    groups: list[list[tuple[int, int]]] = [[] for _ in ref_names]
    for p, name in enumerate(pred_names):
        ref, sep, j = str(name).rpartition("#")
        if not sep or not j.isdigit():
            raise ValueError(
                f"prediction {p} is named {name!r}: CSP predictions are named 'ID#j' (the "
                "j-th prediction for test crystal ID), as `autoperi csp --split` writes them"
            )
        if ref not in index:
            raise ValueError(f"prediction {p} ({name!r}) names no crystal of the reference")
        groups[index[ref]].append((int(j), p))
    return [[p for _, p in sorted(g)] for g in groups]


def _rms_pairs(
    pairs: list[tuple[Crystal, Crystal]], tolerances: Mapping[str, float], workers, progress
) -> np.ndarray:
    """[len(pairs)] normalised RMS of each (prediction, reference) pair (NaN: no match),
    by the project's one match-rate implementation (`autoperi_jax.matching.match_rms`)."""

    def map_chunks(fn, items):
        return parallel_map(
            fn, items, workers=workers, chunk_size=64, desc="matching", progress=progress,
            unit="pair",
        )  # fmt: skip

    preds = [p for p, _ in pairs]
    refs = [r for _, r in pairs]
    return match_rms(preds, refs, tolerances, map_chunks=map_chunks)


def csp_metrics(
    preds: Sequence[Crystal | None],
    refs: Sequence[Crystal],
    groups: Sequence[Sequence[int]],
    pred_valid: np.ndarray,
    ref_valid: np.ndarray,
    ks: Sequence[int] = (1, 20),
    tolerances: Mapping[str, float] = M.CDVAE_MATCHER,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Match rate and RMSE at each k (module docstring).

    Args:
      preds: every prediction; refs: the test crystals.
      groups: [len(refs)] indices into ``preds`` of each test crystal's predictions, in
        order (`group_predictions`).
      pred_valid, ref_valid: validity masks.
      ks: the k asked for; each needs k predictions for every test crystal.

    Returns:
      ``match_rate_k{k}``, ``rmse_k{k}``, ``n_matched_k{k}`` for each k, ``n_reference``,
      ``rms`` ([len(refs), max k] RMS of each counted pair, NaN otherwise).

    Raises:
      ValueError: a test crystal with fewer than max(ks) predictions.
    """
    kmax = max(ks)
    short = [i for i, g in enumerate(groups) if len(g) < kmax]
    if short:
        raise ValueError(
            f"{len(short)} test crystals have fewer than k = {kmax} predictions (the first: "
            f"reference {short[0]} with {len(groups[short[0]])})"
        )
    n = len(refs)
    todo = [(i, j) for i in range(n) for j in range(kmax)
            if preds[groups[i][j]] is not None and pred_valid[groups[i][j]]
            and (j > 0 or kmax > 1 or ref_valid[i])]  # fmt: skip
    rms = np.full((n, kmax), np.nan)
    r = _rms_pairs([(preds[groups[i][j]], refs[i]) for i, j in todo], tolerances, workers,
                   progress)  # fmt: skip
    for (i, j), v in zip(todo, r):
        rms[i, j] = v
    out: dict[str, Any] = {"n_reference": n}
    for k in ks:
        r_k = rms[:, :k].copy()
        if k == 1:
            r_k[~np.asarray(ref_valid, bool)] = np.nan  # RecEval: both valid
        matched = np.isfinite(r_k).any(1)
        best = np.where(matched, np.nanmin(np.where(np.isfinite(r_k), r_k, np.inf), 1), np.nan)
        out[f"match_rate_k{k}"] = float(matched.sum() / n) if n else 0.0
        out[f"rmse_k{k}"] = float(best[matched].mean()) if matched.any() else float("nan")
        out[f"n_matched_k{k}"] = int(matched.sum())
    out["rms"] = rms
    return out


def single_answer_ceiling(
    refs: Sequence[Crystal],
    ref_valid: np.ndarray,
    tolerances: Mapping[str, float] = M.CDVAE_MATCHER,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The k = 1 match rate of the best predictor that gives one structure per composition.

    Test crystals are grouped by the atoms of their cell (the CSP input). Within a group the
    best single answer is taken to be one of the group's own valid structures, the one that
    matches the most valid members (a lower bound on what any answer could match; with one
    member it is that member).

    Returns:
      ``compositions``, ``compositions_with_polymorphs`` (groups of more than one test
      crystal), ``crystals_in_polymorph_groups``, ``match_rate_ceiling_k1``.
    """
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, c in enumerate(refs):
        groups[tuple(sorted(c.numbers.tolist()))].append(i)
    valid = np.asarray(ref_valid, bool)
    multi = [g for g in groups.values() if len(g) > 1]
    pairs = [(a, b) for g in multi for a in g for b in g if a != b and valid[a] and valid[b]]
    r = _rms_pairs([(refs[a], refs[b]) for a, b in pairs], tolerances, workers, progress)
    hits: dict[int, set[int]] = defaultdict(set)
    for (a, b), v in zip(pairs, r):
        if np.isfinite(v):
            hits[a].add(b)
    best = 0
    for g in groups.values():
        best += max((1 + len(hits[a] & set(g)) for a in g if valid[a]), default=0)
    return {
        "compositions": len(groups),
        "compositions_with_polymorphs": len(multi),
        "crystals_in_polymorph_groups": int(sum(len(g) for g in multi)),
        "match_rate_ceiling_k1": best / len(refs) if len(refs) else 0.0,
    }
