"""Training of the periodic autoencoder: one code path from one CPU to many devices / hosts.

``train_and_evaluate(config, workdir)`` (flax-examples style; ``autoperi train``): load the
dataset, compute normalisers, build `autoperi_jax.nn.Autoencoder`, and train the loss
``L_recon + beta_phys L_phys`` (`autoperi_jax.loss.make_loss_fn`; `make_phys_fn` adapts
``config.physics`` to `autoperi_jax.physics.make_objective_fn`) with the optimizer, train
step and loop of `train.loop` (gradient clipping + AdamW or SGD, warm-up + cosine decay,
optional EMA; non-finite steps skipped). Data parallel with `jax.jit` + `NamedSharding`
over a device mesh (`train.parallel`): state from `jax.eval_shape` + ``out_shardings``, a
donated step, the batch sharded on the ``data`` axis, every process building its own
shards; multi-host via `jax.distributed.initialize` (called by the CLI). Metrics go to
``metrics.jsonl`` and TensorBoard event files with a tqdm bar; the validation split is
evaluated every ``eval_every`` steps (or epoch), with the quick match rate of
`autoperi_jax.reconstruct`; Orbax checkpoints (`autoperi_jax.checkpoint.Checkpointer`:
last N + best on validation, async; state + config + normalisers + data-iterator
position) are written every ``checkpoint_every`` steps and on SIGTERM / SIGINT. Running
the same command again resumes bit for bit: step keys are ``jax.random.fold_in(key,
step)`` and the batch order a function of (seed, position).

The latent flow (``alpha L_gen``) is a second stage on the frozen encoder's z
(`train.flow_stage`, trained by the same loop): a deterministic encoder trained jointly
with a likelihood on z could shrink z to inflate log p.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from autoperi_jax import physics, reconstruct
from autoperi_jax.api import pretrained_path
from autoperi_jax.checkpoint import (
    CHECKPOINT_FORMAT,
    Checkpointer,
    is_legacy,
    load_checkpoint,
    load_pytree,
    step_dirs,
)
from autoperi_jax.crystal import Crystal, random_rotation
from autoperi_jax.graph import BatchIterator, CrystalGraph, atom_classes, make_buckets, rewrap
from autoperi_jax.loss import make_loss_fn
from autoperi_jax.model import ModelSettings, compute_normalisers, init_params
from autoperi_jax.nn import Autoencoder
from autoperi_jax.physics.composition_host import smact_validity
from autoperi_jax.protocol import CDVAE_MATCHER
from autoperi_jax.reconstruct import ordered_batches, reconstruct_dataset
from autoperi_jax.run_config import build_model, build_settings, load_split
from train import parallel
from train.loop import (
    Logger,
    LoopResult,
    LoopSettings,
    initial_state,
    make_optimizer,
    make_train_step,
    mean_metrics,
    restore_state,
    run_loop,
    sync,
)

__all__ = [
    "augment_graph",
    "make_batch_iterator",
    "make_init_state",
    "make_optimizer",
    "make_phys_fn",
    "make_train_step",
    "match_metrics",
    "train_and_evaluate",
]


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


# ------------------------------------------------------------------------ evaluation
def match_metrics(
    preds: Sequence[Crystal],
    refs: Sequence[Crystal],
    tolerances: dict[str, float] | None = None,
    check_composition: bool = True,
) -> dict[str, float]:
    """`autoperi_jax.reconstruct.match_metrics` with the protocol's defaults: CDVAE's
    matcher tolerances and the SMACT 2.x composition rule
    (`autoperi_jax.physics.composition_host.smact_validity`, unless ``check_composition``
    is off); `autoperi eval --task recon` is the reference."""
    tol = CDVAE_MATCHER if tolerances is None else tolerances
    return reconstruct.match_metrics(
        preds, refs, tol, smact_validity if check_composition else None
    )


# -------------------------------------------------------------------------- training
def make_phys_fn(
    config: ml_collections.ConfigDict, cells: np.ndarray
) -> Callable[..., dict[str, jax.Array]]:
    """`autoperi_jax.physics.make_objective_fn` with the settings of ``config.physics``.

    ``config.physics``: ``potential`` (``'lj'`` / ``'morse'``: UFF, Rappe et al. 1992;
    ``'soft_sphere'``: covalent-radius repulsion), ``cutoff`` [A], ``mp_grid`` (q-points:
    Gamma + Monkhorst-Pack grid) and the `PhysicsObjective` fields ``weights``,
    ``chem_cutoff``, ``en_weight``, ``stability_tolerance``, ``energy_reference``,
    ``chem_reference``.

    Args:
      config: the run config.
      cells: [n, 3, 3] every cell the loss will see (the static image stencil must cover
        the cutoff for the smallest cell height; `physics.n_images_for_cutoff`).

    Returns:
      ``phys_fn`` (`make_objective_fn`), the signature `autoperi_jax.loss.make_loss_fn`
      expects.
    """
    pc = config.physics
    if pc.potential not in _POTENTIALS:
        raise ValueError(
            f"config.physics.potential must be lj, morse or soft_sphere: {pc.potential}"
        )
    pot = _POTENTIALS[pc.potential](pc.cutoff)
    objective = physics.PhysicsObjective(
        potential=pot,
        n_images=physics.n_images_for_cutoff(cells, max(pot.cutoff, pc.chem_cutoff)),
        qpoints=physics.gamma_and_mp_grid(tuple(pc.mp_grid)),
        weights=tuple(float(w) for w in pc.weights),
        chem_cutoff=pc.chem_cutoff,
        en_weight=pc.en_weight,
        stability_tolerance=pc.stability_tolerance,
        energy_reference=bool(pc.energy_reference),
        chem_reference=bool(pc.chem_reference),
    )
    return physics.make_objective_fn(objective)


_POTENTIALS = {
    "lj": lambda cutoff: physics.uff_lennard_jones(cutoff=cutoff),
    "morse": lambda cutoff: physics.uff_morse(cutoff=cutoff),
    "soft_sphere": lambda cutoff: physics.covalent_soft_sphere(),
}


def _num_shards(config: ml_collections.ConfigDict, n_devices: int, n_processes: int) -> int:
    """Shards of the global batch: ``config.num_shards`` (0 = one per device), a multiple
    of the device count. Fix it to compare runs on different device counts: the padding
    budget and the per-shard randomness depend on it, not on the devices."""
    n = int(config.get("num_shards", 0) or n_devices)
    if n % n_devices or n % n_processes or config.batch_size % n:
        raise ValueError(
            f"num_shards={n} must be a multiple of the {n_devices} devices (and of the "
            f"{n_processes} processes) and divide batch_size={config.batch_size}"
        )
    return n


def make_init_state(
    model: Autoencoder, settings: ModelSettings, tx: optax.GradientTransformation, ema_decay: float
) -> Callable[[jax.Array, Any], dict[str, Any]]:
    """``init_state(key, example_batch) -> state`` for `make_train_step` (pure, jit-able;
    `train.parallel.create_state` runs it with replicated ``out_shardings``).

    The state: ``params``, ``opt_state``, ``step`` [] int32, ``nonfinite`` and
    ``nonfinite_total`` [] int32 (the non-finite guard's counters) and, when
    ``ema_decay > 0``, ``ema_params`` (starting at the initial parameters).
    """

    def init_state(key, example):
        return initial_state(init_params(model, example, settings, key), tx, ema_decay > 0)

    return init_state


def make_batch_iterator(
    config: ml_collections.ConfigDict, graphs: Sequence[CrystalGraph], num_shards: int
) -> BatchIterator:
    """The training `BatchIterator` of this process: global ``config.batch_size`` split
    into ``num_shards`` equally padded shards (buckets of ``batch_size // num_shards``
    graphs), of which this process builds ``num_shards // process_count`` (its own).
    ``config.data.atom_buckets`` > 1 batches by atom count (`atom_classes`: that many
    classes at most, each with ``num_buckets`` padding budgets and its own dense width)."""
    rot = config.data.get("augment_rotate", False)
    shift = config.data.get("augment_shift", False)
    augment = (lambda g, rng: augment_graph(g, rng, rot, shift)) if (rot or shift) else None
    n_node = np.array([len(g.numbers) for g in graphs])
    n_edge = np.array([len(g.senders) for g in graphs])
    shard = config.batch_size // num_shards
    slots = buckets = None
    if config.data.get("atom_buckets", 1) > 1:
        slots = atom_classes(
            n_node, config.model.max_atoms, config.data.atom_buckets, 2 * config.batch_size
        )
    else:
        buckets = make_buckets(n_node, n_edge, shard, config.data.num_buckets, config.seed)
    return BatchIterator(
        graphs,
        config.batch_size,
        buckets=buckets,
        seed=config.seed,
        local_shards=num_shards // jax.process_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        augment=augment,
        atom_slots=slots,
        num_buckets=config.data.num_buckets,
    )


def _load_data(config: ml_collections.ConfigDict, progress: bool):
    """Train (and, with evaluation, validation) split on every process. Every process
    holds the sizes of every graph (the global batch order is a function of the seed) but
    builds only its own shards; process 0 loads first, the others then read its cache."""

    def load():
        train = load_split(config, "train", progress)
        val = load_split(config, "val", progress) if config.eval_every else None
        return train, val

    lead = jax.process_index() == 0
    out = load() if lead else None
    sync("data")
    return out if lead else load()


def _open_checkpoints(config: ml_collections.ConfigDict, ckpt_dir: Path, eval_on: bool):
    """The run's `Checkpointer`: last ``keep_checkpoints`` + best ``val_loss``."""
    steps = step_dirs(ckpt_dir) if ckpt_dir.is_dir() else []
    if steps and is_legacy(ckpt_dir / str(steps[-1])):
        raise ValueError(
            f"{ckpt_dir} holds checkpoints of the format-1 layout; `load_checkpoint` reads "
            "them, but training resumes only format-2 runs: use a new workdir"
        )
    return Checkpointer(
        ckpt_dir,
        max_to_keep=int(config.get("keep_checkpoints", 3)),
        best_metric="val_loss" if eval_on else None,
        async_save=bool(config.get("async_checkpoint", True)),
    )


def _source(source: Path) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """``(model config, raw parameters, normalisers)`` of a run's latest checkpoint or
    of an inference bundle (a folder with ``meta.json``, or a shipped model's name)."""
    if not source.exists() and "/" not in str(source):
        try:
            source = pretrained_path(str(source))
        except FileNotFoundError:
            pass
    if (source / "meta.json").exists():
        tree, meta = load_pytree(source)
        ae = meta["autoencoder"]
        return dict(ae["model"]), tree["autoencoder"], ae["normalisers"]
    try:
        ck = load_checkpoint(source)
    except FileNotFoundError as e:
        raise ValueError(f"config.init_from={source}: {e}") from None
    return ck["config"].model.to_dict(), ck["raw_params"], ck["normalisers"]


def _overlay(fresh: Any, theirs: Any) -> tuple[Any, list[str]]:
    """``fresh`` with every leaf that ``theirs`` has at the same path and shape replaced
    by it; also returns the paths kept fresh."""
    found = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(theirs)}
    kept: list[str] = []

    def pick(path: Any, leaf: Any) -> Any:
        other = found.get(jax.tree_util.keystr(path))
        if other is not None and np.shape(other) == np.shape(leaf):
            return jnp.asarray(other, leaf.dtype)
        kept.append(jax.tree_util.keystr(path))
        return leaf

    return jax.tree_util.tree_map_with_path(pick, fresh), kept


def _init_from(
    config: ml_collections.ConfigDict,
    source: Path,
    tx: optax.GradientTransformation,
    ema_decay: float,
    mesh: Any,
    fresh: Callable[[], Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fine-tuning start: the parameters (and normalisers) of another run's latest
    checkpoint (format 1 or 2) or of an inference bundle (``RUN/flow/model``, or a
    shipped model's name such as ``mp_20``), with a fresh optimiser state and step 0
    (`initial_state`).

    By default the model config must equal the source's (the parameter tree follows
    from it). With ``config.init_partial`` it may differ: every parameter whose path and
    shape the source has is copied, the others keep their fresh initialisation and are
    listed (e.g. a new composition head on a trained encoder and decoder).

    Raises:
      ValueError: the source has no checkpoint, or was trained with another model
        config and ``init_partial`` is off.
    """
    theirs, params, normalisers = _source(source)
    if not config.get("init_partial", False):
        ours = config.model.to_dict()
        default = {f.name: f.default for f in dataclasses.fields(Autoencoder)}
        diff = sorted(
            k
            for k in set(theirs) | set(ours)
            if theirs.get(k, default.get(k)) != ours.get(k, default.get(k))
        )
        if diff:
            raise ValueError(
                f"config.init_from={source} was trained with another model config (keys "
                f"{', '.join(diff)} differ); use its config.model values, or set "
                "config.init_partial=True to copy the parameters that still fit"
            )
        params = jax.tree.map(jnp.asarray, params)
    else:
        params, kept = _overlay(jax.device_get(fresh()["params"]), params)
        if jax.process_index() == 0:
            print(
                f"init_partial: {len(kept)} parameter arrays start fresh"
                + (f" ({', '.join(kept)})" if kept else ""),
                flush=True,
            )
    state = parallel.create_state(
        functools.partial(initial_state, tx=tx, ema=ema_decay > 0), mesh, params
    )
    return state, normalisers


def _start_state(
    config: ml_collections.ConfigDict,
    ckpt: Checkpointer,
    it: BatchIterator,
    abstract: Any,
    fresh: Callable[[], Any],
    normalisers: dict[str, Any],
    tx: optax.GradientTransformation,
    ema_decay: float,
    mesh: Any,
) -> tuple[Any, dict[str, Any], int | None]:
    """The state to train from: the run's newest readable checkpoint (and the iterator
    position and normalisers saved with it), else ``config.init_from``'s parameters
    (`_init_from`), else ``fresh()``.

    Returns:
      ``(state, normalisers, restored_from)`` (``restored_from``: the resumed step or None).
    """
    lead = jax.process_index() == 0
    if ckpt.steps():
        state, saved, step = restore_state(ckpt, abstract)
        it.restore(saved["data"])
        if lead:
            print(f"restored checkpoint at step {step} from {ckpt.directory}", flush=True)
        return state, saved["normalisers"], step  # the restored parameters' normalisers
    if config.get("init_from"):
        state, normalisers = _init_from(config, Path(config.init_from), tx, ema_decay, mesh, fresh)
        if lead:
            print(f"initialised parameters from {config.init_from}", flush=True)
        return state, normalisers, None
    return fresh(), normalisers, None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Trains the autoencoder described by ``config`` and writes everything to ``workdir``.

    One code path from one CPU to many devices and hosts: a 1-D ``data`` mesh over
    `jax.devices()` (`train.parallel`); the train state (params, optimiser, optional EMA,
    non-finite counters) is built with `jax.eval_shape` + jit ``out_shardings``
    (replicated); the step is jitted with ``donate_argnums``; each global batch is
    ``num_shards`` equally padded shards on a leading axis sharded over ``data``, of which
    every process builds only its own (`BatchIterator` with ``process_index``). Step keys
    are ``fold_in(train_key, step)`` and the iterator is a pure function of (seed,
    position), so re-running the same command resumes the same run bit for bit from the
    newest readable checkpoint (a corrupt one is skipped with a warning). The loop is
    `train.loop.run_loop`, shared with the latent-flow stage.

    Loss: ``L_recon + beta_phys L_phys`` (`autoperi_jax.loss.make_loss_fn`, `make_phys_fn`);
    the latent flow's ``alpha L_gen`` is a separate second stage on frozen z (logged as
    ``alpha_gen = 0``). Non-finite steps are skipped and counted; after
    ``max_nonfinite_steps`` in a row training stops with `FloatingPointError` (the last
    checkpoint is kept). SIGTERM / SIGINT save a checkpoint at the current step and return
    (``summary["interrupted"]``).

    Files: ``config.json``; ``metrics.jsonl`` (one JSON object per logged step:
    ``{"step", "split", "time_s", ...metrics}``, splits ``info`` / ``train`` / ``val``);
    ``tensorboard/`` (event files); ``checkpoints/`` (Orbax, last ``keep_checkpoints`` +
    best ``val_loss``; `autoperi_jax.checkpoint.load_checkpoint`); ``summary.json``.

    Returns:
      ``{"train": last train record, "eval": last validation record, "summary": {...}}``.
    """
    t_start = time.perf_counter()
    workdir = Path(workdir)
    lead = jax.process_index() == 0
    if lead:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    sync("workdir")
    progress = bool(config.get("progress", True)) and lead

    train_ds, val_ds = _load_data(config, progress)
    mesh = parallel.make_mesh()
    num_shards = _num_shards(config, mesh.size, jax.process_count())
    it = make_batch_iterator(config, train_ds.graphs, num_shards)
    model, settings = build_model(config), build_settings(config)
    tx, schedule = make_optimizer(config)
    ema_decay = float(config.get("ema_decay", 0.0))
    init_key, train_key, eval_key = jax.random.split(jax.random.PRNGKey(config.seed), 3)
    example = next(iter(ordered_batches(train_ds.graphs[:2], 2)))[0]
    init_state = make_init_state(model, settings, tx, ema_decay)
    abstract = parallel.abstract_state(init_state, mesh, init_key, example)
    eval_on, total = bool(config.eval_every), int(config.num_train_steps)
    ckpt = _open_checkpoints(config, workdir / "checkpoints", eval_on)
    state, normalisers, restored_from = _start_state(
        config, ckpt, it, abstract,
        functools.partial(parallel.create_state, init_state, mesh, init_key, example),
        compute_normalisers(train_ds.graphs), tx, ema_decay, mesh,
    )  # fmt: skip

    phys_fn = None
    if settings.beta_phys > 0:
        cells = np.stack([g.cell for g in train_ds.graphs + (val_ds.graphs if val_ds else [])])
        phys_fn = make_phys_fn(config, cells)
    loss_fn = make_loss_fn(model, settings, normalisers, phys_fn)
    train_step = parallel.jit_train_step(
        make_train_step(parallel.sharded_loss(loss_fn), tx, schedule, ema_decay), mesh
    )
    eval_loss = jax.jit(loss_fn)

    def evaluate(state: dict[str, Any]) -> dict[str, Any]:
        params = jax.device_get(state["ema_params"] if ema_decay > 0 else state["params"])
        return _evaluate(config, model, settings, normalisers, params, val_ds, eval_loss, eval_key)

    def eval_due(done: int) -> bool:
        every = config.eval_every
        return eval_on and (
            (every > 0 and done % every == 0)
            or (every < 0 and done % it.steps_per_epoch == 0)
            or done == total
        )

    def meta() -> dict[str, Any]:
        return {
            "config": config.to_dict(),
            "normalisers": normalisers,
            "data": it.state(),
            "format": CHECKPOINT_FORMAT,
        }

    log = Logger(workdir, lead, bool(config.get("tensorboard", True)))
    start_step = int(state["step"])
    log(
        {
            "step": start_step,
            "split": "info",
            "num_params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"])),
            "num_devices": mesh.size,
            "num_processes": jax.process_count(),
            "num_shards": num_shards,
            "alpha_gen": 0.0,  # L_gen: second stage (latent flow on frozen z), not here
            "beta_phys": float(settings.beta_phys),
            "ema_decay": ema_decay,
            "resumed_from": restored_from,
            **normalisers,
        }
    )
    try:
        result = run_loop(
            state, train_step, it, train_key, mesh, ckpt, meta, log,
            _loop_settings(config, progress), t_start, evaluate, eval_due,
        )  # fmt: skip
    finally:
        best_step = ckpt.best_step() if eval_on else None
        ckpt.close()
        log.close()
    summary = _summary(config, workdir, result, it, mesh, num_shards, start_step, t_start)
    summary.update(resumed_from=restored_from, best_step=best_step, ema_decay=ema_decay)
    if lead:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
        if config.get("print_summary", True):
            _print_summary(summary)
    return {**result.last, "summary": summary}


def _loop_settings(config: ml_collections.ConfigDict, progress: bool) -> LoopSettings:
    """`LoopSettings` of an autoencoder run (best checkpoint: lowest ``val_loss``)."""
    return LoopSettings(
        num_steps=int(config.num_train_steps),
        log_every=config.log_every,
        checkpoint_every=config.checkpoint_every,
        max_nonfinite_steps=int(config.get("max_nonfinite_steps", 10)),
        signal_sync_every=int(config.get("signal_sync_every", 10)),
        best_metric=("val_loss", "loss"),
        progress=progress,
        postfix=(("loss", "loss"), ("coord", "l_coord")),
    )


def _summary(
    config: ml_collections.ConfigDict,
    workdir: Path,
    result: LoopResult,
    it: BatchIterator,
    mesh: Any,
    num_shards: int,
    start_step: int,
    t_start: float,
) -> dict[str, Any]:
    """The run's ``summary.json`` (steps, timing, devices, last records); the keys
    ``resumed_from``, ``best_step`` and ``ema_decay`` are placeholders the caller fills."""
    end_step = int(result.state["step"])
    n_steps = end_step - start_step
    step_s = result.timer.step_s(n_steps)
    return {
        "workdir": str(workdir),
        "start_step": start_step,
        "end_step": end_step,
        "num_train_steps": int(config.num_train_steps),
        "resumed_from": None,
        "interrupted": result.interrupted is not None,
        "signal": result.interrupted,
        "wall_s": time.perf_counter() - t_start,
        "setup_s": result.timer.t0 - t_start,
        "first_step_s": result.timer.first_step_s,
        "step_s": step_s,
        "crystals_per_s": config.batch_size / step_s if n_steps > 1 else float("nan"),
        "epoch_s_estimate": it.steps_per_epoch * step_s if n_steps > 1 else float("nan"),
        "steps_per_epoch": it.steps_per_epoch,
        "batch_shapes": result.batch_shapes,
        "num_devices": mesh.size,
        "num_processes": jax.process_count(),
        "num_shards": num_shards,
        "nonfinite_total": int(result.state["nonfinite_total"]),
        "best_step": None,
        "loss": "L_recon + beta_phys * L_phys (alpha * L_gen: separate latent-flow stage)",
        "beta_phys": float(config.objective.beta_phys),
        "ema_decay": None,
        "last_train": result.last.get("train"),
        "last_eval": result.last.get("eval"),
    }


def _print_summary(s: dict[str, Any]) -> None:
    lines = [
        f"run {s['workdir']}: steps {s['start_step']} -> {s['end_step']} of "
        f"{s['num_train_steps']}" + (" (interrupted)" if s["interrupted"] else ""),
        f"  {s['wall_s']:.1f} s wall, first step (compile) {s['first_step_s'] or 0:.1f} s, "
        f"{s['step_s']:.3f} s/step, {s['crystals_per_s']:.1f} crystals/s, "
        f"epoch ~{s['epoch_s_estimate']:.1f} s",
        f"  {s['num_devices']} devices / {s['num_processes']} processes, "
        f"{s['num_shards']} shards, {s['batch_shapes']} batch shapes, "
        f"{s['nonfinite_total']} non-finite steps skipped",
    ]
    if s["last_train"]:
        lines.append(f"  train loss {s['last_train']['loss']:.4f}")
    if s["last_eval"]:
        lines.append(f"  val loss {s['last_eval']['loss']:.4f} (best step {s['best_step']})")
    print("\n".join(lines), flush=True)


def _evaluate(config, model, settings, normalisers, params, val_ds, eval_loss, key):
    """Validation loss on ``eval_batches`` batches (in dataset order) and, if
    ``eval_recon`` > 0, the quick match rate of that many validation crystals
    (`match_metrics`). ``params`` are host arrays (the EMA ones when kept)."""
    out: dict[str, Any] = {}
    hist = []
    graphs = val_ds.graphs
    for b, (batch, _) in enumerate(ordered_batches(graphs, config.batch_size)):
        if b >= config.eval_batches:
            break
        _, m = eval_loss(params, batch, jax.random.fold_in(key, b))
        hist.append(m)
    out.update(mean_metrics(jax.device_get(hist)))
    n = min(int(config.get("eval_recon", 0)), len(graphs))
    if n:
        preds, secs = reconstruct_dataset(
            model, settings, normalisers, params, graphs[:n], val_ds.ids[:n], config.batch_size
        )
        refs = [val_ds.crystal(i) for i in range(n)]
        out.update({f"recon_{k}": v for k, v in match_metrics(preds, refs).items()})
        out["recon_time_s"] = secs
    return out
