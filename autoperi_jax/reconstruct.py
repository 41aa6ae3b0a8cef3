"""Reconstruction: encode and decode a split with a trained autoencoder, and score it.

* `reconstruct_dataset` decodes graphs in dataset order (padded batches of one budget,
  batch ``b`` decoded with ``fold_in(PRNGKey(seed), b)``); `reconstruct_run` does it for a
  training run or an inference bundle and a named split (``autoperi reconstruct``).
* `match_metrics`: the quick reconstruction check of the CDVAE protocol (the trainer's
  validation, ``autoperi reconstruct``), over the one match-rate implementation of
  `autoperi_jax.matching` that `eval.metrics.reconstruction_metrics` uses too.
* `bond_graph` / `connectivity_metrics`: how well the decoded periodic bonds are
  reconstructed.

Host code (NumPy, pymatgen) around the jitted `autoperi_jax.model.make_reconstruct_fn`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from tqdm import tqdm

from autoperi_jax.api import load
from autoperi_jax.checkpoint import load_checkpoint
from autoperi_jax.convert import decoded_bonds, decoded_to_crystals
from autoperi_jax.crystal import Crystal, write_structures
from autoperi_jax.datasets import load_dataset
from autoperi_jax.elements import COVALENT_RADIUS
from autoperi_jax.graph import (
    CrystalGraph,
    GraphSettings,
    batch_graphs,
    make_buckets,
    neighbor_list,
    select_bucket,
)
from autoperi_jax.matching import match_rms, match_summary
from autoperi_jax.model import ModelSettings, make_reconstruct_fn
from autoperi_jax.nn import Autoencoder
from autoperi_jax.run_config import build_model, build_settings, load_split
from autoperi_jax.sampling import SamplerSettings, decoding_settings

__all__ = [
    "Reconstruction",
    "bond_graph",
    "connectivity_metrics",
    "match_metrics",
    "ordered_batches",
    "reconstruct_dataset",
    "reconstruct_run",
    "structurally_valid",
]


# --------------------------------------------------------------------------- matching
def structurally_valid(crystal: Crystal, cutoff: float = 0.5, min_volume: float = 0.1) -> bool:
    """CDVAE's structural validity (volume >= ``min_volume`` A^3, every periodic distance
    >= ``cutoff`` A) with `Crystal.min_distance`."""
    return crystal.volume >= min_volume and (
        crystal.num_atoms < 2 or crystal.min_distance() >= cutoff
    )


def match_metrics(
    preds: Sequence[Crystal],
    refs: Sequence[Crystal],
    tolerances: Mapping[str, float],
    composition_valid: Callable[[list[int]], bool] | None = None,
) -> dict[str, float]:
    """Quick reconstruction check of the CDVAE protocol (in this process).

    Match rate = matched valid predictions / references; RMSE = mean RMS distance over
    those matches (`match_rms`, `match_summary`). A prediction is valid when it is
    structurally valid (`structurally_valid`) and, if ``composition_valid`` is given (e.g.
    the SMACT 2.x rule, `eval.metrics.smact_validity`), its composition passes.

    Returns:
      dict: ``match_rate``, ``rmse``, ``valid_rate``, ``match_rate_any`` (ignoring
      validity), ``composition_checked`` (1.0 if ``composition_valid`` was applied), ``n``.
    """
    valid = np.array(
        [
            structurally_valid(p)
            and (composition_valid is None or composition_valid(p.numbers.tolist()))
            for p in preds
        ],
        bool,
    )
    rms = match_rms(preds, refs, tolerances)
    n = len(refs)
    summary = match_summary(np.where(valid, rms, np.nan))
    return {
        "match_rate": summary["match_rate"],
        "rmse": summary["rmse"],
        "valid_rate": float(np.mean(valid)) if len(valid) else 0.0,
        "match_rate_any": float(np.isfinite(rms).sum() / max(n, 1)),
        "composition_checked": float(composition_valid is not None),
        "n": float(n),
    }


# -------------------------------------------------------------------------- bonds
def bond_graph(crystal: Crystal, cutoff: float, tolerance: float) -> set[tuple[int, ...]]:
    """Edges (i, j, k_x, k_y, k_z) of the covalent-radius bond criterion of
    `autoperi_jax.model.bond_targets` within ``cutoff`` (host)."""
    recv, send, shifts, dist = neighbor_list(crystal.frac_coords, crystal.cell, cutoff)
    r = np.asarray(COVALENT_RADIUS)[crystal.numbers]
    ok = dist < (1.0 + tolerance) * (r[recv] + r[send])
    return {(int(i), int(j), *map(int, k)) for i, j, k in zip(recv[ok], send[ok], shifts[ok])}


def connectivity_metrics(
    preds: Sequence[Crystal],
    bonds: Sequence[dict[str, np.ndarray]],
    refs: Sequence[Crystal],
    cutoff: float,
    tolerance: float,
) -> dict[str, float]:
    """How well the decoded periodic bonds are reconstructed.

    * ``bond_f1``: F1 of the decoder's bonds (i, j, k_ij) against the bond criterion
      applied to the decoded geometry (does the connectivity head read its own structure
      right);
    * ``coordination_match``: share of crystals whose multiset of (species, number of
      decoded bonds) equals that of the reference crystal's bond graph (order and origin
      free, so it compares with the reference directly).
    """
    tp = fp = fn = 0
    same = []
    for p, b, r in zip(preds, bonds, refs):
        got = {
            (int(i), int(j), *map(int, k))
            for i, j, k in zip(b["receivers"], b["senders"], b["shifts"])
        }
        want = bond_graph(p, cutoff, tolerance)
        tp += len(got & want)
        fp += len(got - want)
        fn += len(want - got)
        cn_p = np.bincount(np.asarray(b["receivers"], int), minlength=p.num_atoms)
        ref_edges = bond_graph(r, cutoff, tolerance)
        cn_r = np.bincount([e[0] for e in ref_edges], minlength=r.num_atoms)
        same.append(
            sorted(zip(p.numbers.tolist(), cn_p.tolist()))
            == sorted(zip(r.numbers.tolist(), cn_r.tolist()))
        )
    f1 = 2 * tp / max(2 * tp + fp + fn, 1)
    return {"bond_f1": float(f1), "coordination_match": float(np.mean(same)) if same else 0.0}


# ------------------------------------------------------------------- reconstruction
def ordered_batches(graphs: Sequence[CrystalGraph], batch_size: int) -> Iterable[tuple[Any, int]]:
    """Padded batches in dataset order, all of one budget (the last one partly empty).

    Yields:
      ``(batch, count)``: a `jraph.GraphsTuple` of ``batch_size`` graph slots (+ padding)
      and the number of real graphs in it.
    """
    n_node = np.array([len(g.numbers) for g in graphs])
    n_edge = np.array([len(g.senders) for g in graphs])
    buckets = make_buckets(n_node, n_edge, batch_size, num_buckets=1)
    for start in range(0, len(graphs), batch_size):
        chunk = list(graphs[start : start + batch_size])
        budget = select_bucket(
            buckets,
            int(sum(len(g.numbers) for g in chunk)),
            int(sum(len(g.senders) for g in chunk)),
            len(chunk),
        )
        yield batch_graphs(chunk, budget), len(chunk)


def reconstruct_dataset(
    model: Autoencoder,
    settings: ModelSettings,
    normalisers: dict[str, Any],
    params: Any,
    graphs: Sequence[CrystalGraph],
    names: Sequence[str],
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
    bonds: list | None = None,
    **teacher: bool,
) -> tuple[list[Crystal], float]:
    """Encodes and decodes every graph, in order.

    Args:
      model, settings, normalisers, params: the trained autoencoder.
      graphs, names: the crystals and their names.
      batch_size: graphs per padded batch (`ordered_batches`).
      seed: batch ``b`` decodes with ``fold_in(PRNGKey(seed), b)``.
      progress: tqdm bar.
      bonds: if a list is given, the decoded bonds of every crystal are appended to it
        (`autoperi_jax.convert.decoded_bonds`).
      teacher: teacher-forcing flags of `autoperi_jax.model.make_reconstruct_fn`.

    Returns:
      The decoded crystals (same order as ``graphs``) and the wall time in seconds
      (including compilation).
    """
    fn = jax.jit(make_reconstruct_fn(model, settings, normalisers, **teacher))
    key = jax.random.PRNGKey(seed)
    out: list[Crystal] = []
    t0 = time.perf_counter()
    batches = ordered_batches(graphs, batch_size)
    total = math.ceil(len(graphs) / batch_size)
    for b, (batch, count) in enumerate(tqdm(batches, total=total, disable=not progress)):
        decoded = fn(params, batch, jax.random.fold_in(key, b))
        start = len(out)
        out.extend(
            decoded_to_crystals(decoded, batch.globals["mask"], names[start : start + count])
        )
        if bonds is not None:
            bonds.extend(decoded_bonds(decoded, batch.globals["mask"]))
    return out, time.perf_counter() - t0


class Reconstruction(NamedTuple):
    """What `reconstruct_run` returns."""

    preds: list[Crystal]  # decoded crystals, split order
    refs: list[Crystal]  # the split's crystals
    seconds: float  # wall time of encoding + decoding
    bonds: list[dict[str, np.ndarray]]  # decoded bonds per crystal
    settings: ModelSettings  # the decoding settings used


def reconstruct_run(
    workdir: str | Path,
    split: str = "test",
    out: str | Path | None = None,
    batch_size: int = 256,
    seed: int = 0,
    num_steps: int | None = None,
    limit: int | None = None,
    progress: bool = True,
    prior_noise: float | None = 0.0,
) -> Reconstruction:
    """Reconstructs a split with a trained run; writes ``out`` (extxyz) in split order.

    Args:
      workdir: a training run (its latest checkpoint), or an inference bundle folder
        holding ``meta.json`` (``RUN/flow/model``, `autoperi_jax.api.pretrained_path`):
        then the bundle's autoencoder and its training dataset are used.
      split, out, batch_size, seed, num_steps, limit, progress: as the CLI options.
      prior_noise: std (fractional) of the noise around the coordinate guess where the
        decoding flow starts; ``None`` = the training value (``ModelSettings.prior_noise``,
        0.03 for Perov-5). Default 0: deterministic decoding from the guess itself, the
        mean of the training start distribution. Perov-5 validation (first 1,000
        crystals, shipped model, 5 steps): RMSE 0.0190 at 0 vs 0.0235 at 0.03, the same
        match rate.
    """
    workdir = Path(workdir)
    if (workdir / "meta.json").exists():
        gen = load(workdir)
        model, settings, normalisers = gen.model, gen.settings, gen.normalisers
        params = gen.params["autoencoder"]
        ds = load_dataset(
            gen.meta["autoencoder"]["dataset"],
            split=split,
            settings=GraphSettings(cutoff=gen.graph_cutoff, max_neighbors=gen.graph_max_neighbors),
            progress=progress,
        )
        if limit:
            ds.graphs, ds.ids = ds.graphs[:limit], ds.ids[:limit]
    else:
        ckpt = load_checkpoint(workdir)
        config = ckpt["config"]
        model, settings = build_model(config), build_settings(config)
        normalisers, params = ckpt["normalisers"], ckpt["params"]
        if limit is not None:
            with config.unlocked():
                config.data[f"limit_{split}"] = limit
        ds = load_split(config, split, progress)
    # the sampler's overrides, applied the same way (None keeps the trained value)
    overrides = SamplerSettings(num_steps=num_steps, prior_noise=prior_noise)
    settings = decoding_settings(settings, overrides)
    bonds: list[dict[str, np.ndarray]] = []
    preds, secs = reconstruct_dataset(
        model, settings, normalisers, params, ds.graphs, ds.ids, batch_size, seed, progress,
        bonds=bonds,
    )  # fmt: skip
    if out is not None:
        write_structures(preds, out)
    refs = [ds.crystal(i) for i in range(len(ds))]
    return Reconstruction(preds, refs, secs, bonds, settings)
