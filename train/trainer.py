"""A small training entry point for the periodic autoencoder.

``train_and_evaluate(config, workdir)`` (flax-examples style): load the dataset, compute
normalisers, build `autoperi_jax.nn.Autoencoder`, train with AdamW (linear warm-up +
cosine decay, gradient clipping) and a jitted, donated train step, log metrics to
``workdir/metrics.jsonl`` with a tqdm bar, evaluate on the validation split, and save
Orbax checkpoints (state + config JSON + normalisers + data-iterator position) every
``checkpoint_every`` steps and at the end. A run restarts from its latest checkpoint.

The pieces a larger (sharded, multi-host) trainer reuses are pure: `make_train_step`
wraps ``loss_fn(params, batch, key)`` from `autoperi_jax.model.make_loss_fn`, and the
step key is ``jax.random.fold_in(key, step)``, so a resumed run replays the same
randomness.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from autoperi_jax.crystal import Crystal, random_rotation, write_structures
from autoperi_jax.graph import (
    BatchIterator,
    CrystalGraph,
    GraphSettings,
    batch_graphs,
    make_buckets,
    rewrap,
    select_bucket,
)
from autoperi_jax.model import (
    ModelSettings,
    compute_normalisers,
    decoded_bonds,
    decoded_to_crystals,
    init_params,
    make_loss_fn,
    make_reconstruct_fn,
)
from autoperi_jax.nn import Autoencoder

__all__ = [
    "bond_graph",
    "build_model",
    "build_settings",
    "connectivity_metrics",
    "load_checkpoint",
    "make_optimizer",
    "make_train_step",
    "match_metrics",
    "reconstruct_dataset",
    "train_and_evaluate",
]

CDVAE_MATCHER = {"stol": 0.5, "angle_tol": 10.0, "ltol": 0.3}


# ---------------------------------------------------------------------------- builders
def build_model(config: ml_collections.ConfigDict) -> Autoencoder:
    """The `Autoencoder` described by ``config.model`` (its fields, by name)."""
    fields = {f.name for f in dataclasses.fields(Autoencoder)} - {"parent", "name"}
    kwargs = {k: v for k, v in config.model.to_dict().items() if k in fields}
    unknown = set(config.model.to_dict()) - fields
    if unknown:
        raise ValueError(f"unknown config.model fields: {sorted(unknown)}")
    return Autoencoder(**kwargs)


def build_settings(config: ml_collections.ConfigDict) -> ModelSettings:
    """`ModelSettings` from ``config.objective``; cutoffs and ``max_atoms`` come from the
    model so the two cannot disagree."""
    kwargs = dict(config.objective.to_dict())
    kwargs.update(
        max_atoms=config.model.max_atoms,
        flow_cutoff=config.model.dec_cutoff,
        connect_cutoff=config.model.connect_cutoff,
    )
    return ModelSettings(**kwargs)


def graph_settings(config: ml_collections.ConfigDict) -> GraphSettings:
    return GraphSettings(cutoff=config.data.cutoff, max_neighbors=config.data.max_neighbors)


def load_split(config: ml_collections.ConfigDict, split: str, progress: bool = True):
    """`load_dataset` of ``config.data.dataset`` and ``split`` with the config's graph."""
    from autoperi_jax.datasets import load_dataset

    ds = load_dataset(
        config.data.dataset,
        split=split,
        settings=graph_settings(config),
        properties=list(config.data.properties),
        data_dir=config.data.get("data_dir"),
        cache_dir=config.data.get("cache_dir"),
        progress=progress,
    )
    limit = config.data.get(f"limit_{split}")
    if limit:
        ds.graphs, ds.ids = ds.graphs[:limit], ds.ids[:limit]
    too_big = [i for i, g in enumerate(ds.graphs) if len(g.numbers) > config.model.max_atoms]
    if too_big:
        raise ValueError(
            f"{len(too_big)} structures of {config.data.dataset}:{split} have more than "
            f"model.max_atoms={config.model.max_atoms} atoms (first: {ds.ids[too_big[0]]})"
        )
    return ds


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, Any]:
    """AdamW with linear warm-up + cosine decay and global-norm gradient clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(config.num_train_steps, config.warmup_steps + 1),
        end_value=config.learning_rate * config.final_lr_fraction,
    )
    tx = optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(schedule, weight_decay=config.weight_decay),
    )
    return tx, schedule


def make_train_step(
    loss_fn: Callable, tx: optax.GradientTransformation, schedule: Callable | None = None
) -> Callable:
    """Pure train step ``(state, batch, key) -> (state, metrics)``.

    ``state`` is ``{"params", "opt_state", "step"}``; the step's randomness is
    ``fold_in(key, step)``. Not jitted here (the caller chooses jit / shardings).
    """

    def train_step(state, batch, key):
        step_key = jax.random.fold_in(key, state["step"])
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], batch, step_key
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics)
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["grads_finite"] = jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
        ).astype(jnp.float32)
        if schedule is not None:
            metrics["lr"] = schedule(state["step"])
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return train_step


# ----------------------------------------------------------------------- augmentation
def augment_graph(g: CrystalGraph, rng: np.random.Generator, rotate: bool, shift: bool):
    """Random rotation of the cell and/or translation of all atoms (mod 1, with the
    image vectors updated by `autoperi_jax.graph.rewrap`); the same crystal."""
    cell, frac, shifts = g.cell, g.frac_coords, g.shifts
    if shift:
        frac, shifts = rewrap(frac + rng.uniform(size=3), g.senders, g.receivers, shifts)
    if rotate:
        cell = cell @ random_rotation(rng).T
    return g._replace(cell=cell, frac_coords=frac, shifts=shifts)


# ------------------------------------------------------------------------ checkpoints
def _manager(workdir: Path, max_to_keep: int = 2):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=("state", "config", "normalisers", "data"),
    )


def _save(mngr, step: int, state, config, normalisers, data_state) -> None:
    import orbax.checkpoint as ocp

    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(config.to_dict()),
            normalisers=ocp.args.JsonSave(normalisers),
            data=ocp.args.JsonSave(data_state),
        ),
        force=True,
    )


def load_checkpoint(workdir: str | Path, step: int | None = None) -> dict[str, Any]:
    """Restores the latest (or ``step``) checkpoint of a run without a template.

    Returns:
      dict with ``config`` (ConfigDict), ``normalisers``, ``params``, ``step``, ``data``.
    """
    import orbax.checkpoint as ocp

    workdir = Path(workdir)
    mngr = _manager(workdir)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
    meta = mngr.restore(
        step,
        args=ocp.args.Composite(
            config=ocp.args.JsonRestore(),
            normalisers=ocp.args.JsonRestore(),
            data=ocp.args.JsonRestore(),
        ),
    )
    config = ml_collections.ConfigDict(meta["config"])
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    mngr.close()
    return {
        "config": config,
        "normalisers": meta["normalisers"],
        "params": state["params"],
        "step": int(state["step"]),
        "data": meta["data"],
    }


# ------------------------------------------------------------------------ evaluation
def match_metrics(
    preds: Sequence[Crystal],
    refs: Sequence[Crystal],
    tolerances: dict[str, float] | None = None,
    check_composition: bool = True,
) -> dict[str, float]:
    """Quick CDVAE-protocol reconstruction check (pymatgen StructureMatcher).

    Match rate = matched valid predictions / references; RMSE = mean normalised RMS
    distance over matches. Validity is structural (all distances >= 0.5 A, volume >=
    0.1 A^3) and, when ``check_composition`` and the eval package is importable, the
    SMACT 2.x rule of `eval.metrics.smact_validity`; `autoperi eval --task recon` is
    the reference implementation.

    Returns:
      dict: ``match_rate``, ``rmse``, ``valid_rate``, ``n``, plus ``match_rate_any``
      (ignoring validity) and ``composition_checked`` (1.0 if SMACT was applied).
    """
    from pymatgen.analysis.structure_matcher import StructureMatcher

    tol = dict(CDVAE_MATCHER if tolerances is None else tolerances)
    matcher = StructureMatcher(**tol)
    smact = None
    if check_composition:
        try:
            from eval.metrics import smact_validity as smact
        except ImportError:
            smact = None
    rms, valid, any_match = [], [], []
    for p, r in zip(preds, refs):
        ok = p.volume >= 0.1 and (p.num_atoms < 2 or p.min_distance() >= 0.5)
        if smact is not None:
            ok = ok and smact(p.numbers.tolist())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                d = matcher.get_rms_dist(p.to_pymatgen(), r.to_pymatgen())
            except Exception:
                d = None
        valid.append(ok)
        any_match.append(d is not None)
        rms.append(d[0] if (d is not None and ok) else np.nan)
    rms = np.asarray(rms, float)
    m = np.isfinite(rms)
    n = max(len(refs), 1)
    return {
        "match_rate": float(m.sum() / n),
        "rmse": float(rms[m].mean()) if m.any() else float("nan"),
        "valid_rate": float(np.mean(valid)) if valid else 0.0,
        "match_rate_any": float(np.sum(any_match) / n),
        "composition_checked": float(smact is not None),
        "n": float(len(refs)),
    }


def bond_graph(crystal: Crystal, cutoff: float, tolerance: float) -> set[tuple[int, ...]]:
    """Edges (i, j, k_x, k_y, k_z) of the covalent-radius bond criterion of
    `autoperi_jax.model.bond_targets` within ``cutoff`` (host)."""
    from autoperi_jax.elements import COVALENT_RADIUS
    from autoperi_jax.graph import neighbor_list

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


def _ordered_batches(graphs: Sequence[CrystalGraph], batch_size: int) -> Iterable[tuple[Any, int]]:
    """Padded batches in dataset order (last one partly empty); yields (batch, count)."""
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
      bonds: if a list is given, the decoded bonds of every crystal are appended to it
        (`autoperi_jax.model.decoded_bonds`).

    Returns:
      The decoded crystals (same order as ``graphs``) and the wall time in seconds
      (including compilation).
    """
    from tqdm import tqdm

    fn = jax.jit(make_reconstruct_fn(model, settings, normalisers, **teacher))
    key = jax.random.PRNGKey(seed)
    out: list[Crystal] = []
    t0 = time.perf_counter()
    batches = _ordered_batches(graphs, batch_size)
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


# -------------------------------------------------------------------------- training
def _mean_metrics(history: list[dict[str, Any]]) -> dict[str, float]:
    keys = history[0].keys()
    return {k: float(np.mean([float(h[k]) for h in history])) for k in keys}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Trains the autoencoder described by ``config`` and writes everything to ``workdir``.

    Files: ``config.json``, ``metrics.jsonl`` (one JSON object per logged step:
    ``{"step", "split", "time_s", ...metrics}``), ``checkpoints/`` (Orbax).

    Returns:
      The last logged train and eval metrics (``{"train": {...}, "eval": {...}}``).
    """
    from tqdm import tqdm

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    progress = bool(config.get("progress", True))

    train_ds = load_split(config, "train", progress)
    val_ds = load_split(config, "val", progress) if config.eval_every else None
    normalisers = compute_normalisers(train_ds.graphs)
    model = build_model(config)
    settings = build_settings(config)

    aug = config.data.get("augment_rotate", False) or config.data.get("augment_shift", False)
    augment = (
        (
            lambda g, rng: augment_graph(
                g,
                rng,
                config.data.get("augment_rotate", False),
                config.data.get("augment_shift", False),
            )
        )
        if aug
        else None
    )
    it = BatchIterator(
        train_ds.graphs,
        config.batch_size,
        buckets=make_buckets(
            train_ds.n_node,
            train_ds.n_edge,
            config.batch_size,
            config.data.num_buckets,
            config.seed,
        ),
        seed=config.seed,
        augment=augment,
    )
    key = jax.random.PRNGKey(config.seed)
    init_key, train_key, eval_key = jax.random.split(key, 3)
    example = next(iter(_ordered_batches(train_ds.graphs[:4], 4)))[0]
    params = init_params(model, jax.tree.map(jnp.asarray, example), settings, init_key)
    tx, schedule = make_optimizer(config)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    mngr = _manager(workdir)
    if mngr.latest_step() is not None:
        import orbax.checkpoint as ocp

        step0 = mngr.latest_step()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = mngr.restore(
            step0,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
            ),
        )
        state = restored["state"]
        it.restore(restored["data"])
        print(f"restored checkpoint at step {step0} from {workdir}")

    loss_fn = make_loss_fn(model, settings, normalisers)
    train_step = jax.jit(make_train_step(loss_fn, tx, schedule), donate_argnums=(0,))
    eval_loss = jax.jit(loss_fn)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))

    log_path = workdir / "metrics.jsonl"
    logf = open(log_path, "a")

    def log(record: dict[str, Any]) -> None:
        logf.write(json.dumps(record) + "\n")
        logf.flush()

    log({"step": int(state["step"]), "split": "info", "num_params": n_params, **normalisers})
    start_step = int(state["step"])
    history: list[dict[str, Any]] = []
    last: dict[str, Any] = {}
    t_start = time.perf_counter()
    bar = tqdm(
        range(start_step, config.num_train_steps),
        initial=start_step,
        total=config.num_train_steps,
        disable=not progress,
        desc="train",
    )
    for step in bar:
        batch = next(it)
        state, metrics = train_step(state, batch, train_key)
        history.append(metrics)
        done = step + 1
        if done % config.log_every == 0 or done == config.num_train_steps:
            m = _mean_metrics(jax.device_get(history))
            history = []
            m.update(step=done, split="train", time_s=time.perf_counter() - t_start)
            m["epoch"] = done / it.steps_per_epoch
            log(m)
            last["train"] = m
            bar.set_postfix(loss=f"{m['loss']:.4f}", coord=f"{m['l_coord']:.4f}")
            if not math.isfinite(m["loss"]):
                raise FloatingPointError(f"loss is {m['loss']} at step {done}")
        if config.eval_every and (done % config.eval_every == 0 or done == config.num_train_steps):
            last["eval"] = _evaluate(
                config, model, settings, normalisers, state["params"], val_ds, eval_loss, eval_key
            )
            last["eval"].update(step=done, split="val", time_s=time.perf_counter() - t_start)
            log(last["eval"])
        if done % config.checkpoint_every == 0 or done == config.num_train_steps:
            _save(mngr, done, state, config, normalisers, it.state())
    mngr.wait_until_finished()
    mngr.close()
    logf.close()
    return last


def _evaluate(config, model, settings, normalisers, params, val_ds, eval_loss, key):
    """Validation loss on ``eval_batches`` batches and, if ``eval_recon`` > 0, the quick
    match rate of that many validation crystals."""
    out: dict[str, Any] = {}
    hist = []
    graphs = val_ds.graphs
    for b, (batch, _) in enumerate(_ordered_batches(graphs, config.batch_size)):
        if b >= config.eval_batches:
            break
        _, m = eval_loss(params, batch, jax.random.fold_in(key, b))
        hist.append(m)
    out.update(_mean_metrics(jax.device_get(hist)))
    n = min(int(config.get("eval_recon", 0)), len(graphs))
    if n:
        preds, secs = reconstruct_dataset(
            model, settings, normalisers, params, graphs[:n], val_ds.ids[:n], config.batch_size
        )
        refs = [val_ds.crystal(i) for i in range(n)]
        out.update({f"recon_{k}": v for k, v in match_metrics(preds, refs).items()})
        out["recon_time_s"] = secs
    return out


def reconstruct_run(
    workdir: str | Path,
    split: str = "test",
    out: str | Path | None = None,
    batch_size: int = 256,
    seed: int = 0,
    num_steps: int | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> tuple[list[Crystal], list[Crystal], float, list[dict[str, np.ndarray]]]:
    """Reconstructs a split with a trained run; writes ``out`` (extxyz) in split order.

    Returns:
      (predictions, references, seconds, decoded bonds per crystal).
    """
    ckpt = load_checkpoint(workdir)
    config = ckpt["config"]
    model = build_model(config)
    settings = build_settings(config)
    if num_steps is not None:
        settings = dataclasses.replace(settings, num_steps=num_steps)
    if limit is not None:
        with config.unlocked():
            config.data[f"limit_{split}"] = limit
    ds = load_split(config, split, progress)
    bonds: list[dict[str, np.ndarray]] = []
    preds, secs = reconstruct_dataset(
        model,
        settings,
        ckpt["normalisers"],
        ckpt["params"],
        ds.graphs,
        ds.ids,
        batch_size,
        seed,
        progress,
        bonds=bonds,
    )
    if out is not None:
        write_structures(preds, out)
    refs = [ds.crystal(i) for i in range(len(ds))]
    return preds, refs, secs, bonds
