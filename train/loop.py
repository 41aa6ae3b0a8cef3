"""The training loop both stages share: optimizer, train step, and the sharded, resumable loop.

* `OptimizerSettings` / `optimizer`: global-norm clipping, then AdamW (or SGD), with a
  linear warm-up + cosine decay schedule; `make_optimizer` reads them from a run config.
* `make_train_step`: the pure step ``(state, batch, key) -> (state, metrics)`` with the
  non-finite guard (a step whose loss or gradients are not finite changes nothing but the
  step counter) and an optional EMA; step keys are ``fold_in(key, step)``.
* `run_loop`: steps a `jax.jit`-ed train step over a device mesh (`train.parallel`),
  logs means over ``log_every`` steps, evaluates when asked, checkpoints every
  ``checkpoint_every`` steps, after every evaluation, at the end and on SIGTERM / SIGINT
  (`StopRequest`), and stops after ``max_nonfinite_steps`` non-finite steps in a row.
  Together with a batch source that is a pure function of (seed, position) and a
  checkpoint of state + position, re-running a stage resumes it bit for bit.

The autoencoder (`train.trainer.train_and_evaluate`) and the latent flow
(`train.flow_stage.train_flow`) both train through these.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tensorboardX import SummaryWriter
from tqdm import tqdm

from autoperi_jax.checkpoint import Checkpointer, to_jsonable
from train import parallel

__all__ = [
    "Logger",
    "LoopResult",
    "LoopSettings",
    "OptimizerSettings",
    "StopRequest",
    "Timer",
    "initial_state",
    "make_optimizer",
    "make_train_step",
    "mean_metrics",
    "optimizer",
    "restore_state",
    "run_loop",
    "scale_by_path",
    "sync",
]


# --------------------------------------------------------------------------- optimizer
@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """Typed optimizer settings (`optimizer`).

    Attributes:
      learning_rate: peak learning rate.
      num_steps: length of the cosine decay (the stage's number of steps).
      warmup_steps: linear warm-up from 0.
      final_lr_fraction: end value of the decay, as a fraction of the peak.
      weight_decay: AdamW's decoupled weight decay.
      grad_clip: global-norm clipping threshold.
      kind: ``'adamw'`` or ``'sgd'`` (momentum ``momentum``, default none: an update
        linear in the gradient, used to compare device counts exactly; Adam's
        per-parameter normalisation amplifies float32 summation-order noise in near-zero
        gradients).
      momentum: SGD momentum (``None``: plain SGD).
      lr_scales: ``((substring, factor), ...)``: the updates of every parameter whose
        path (`jax.tree_util.keystr`) contains ``substring`` are multiplied by
        ``factor`` (the first match counts), i.e. a per-module learning rate.
    """

    learning_rate: float
    num_steps: int
    warmup_steps: int
    final_lr_fraction: float
    weight_decay: float
    grad_clip: float
    kind: str = "adamw"
    momentum: float | None = None
    lr_scales: tuple[tuple[str, float], ...] = ()

    @classmethod
    def from_config(
        cls, config: ml_collections.ConfigDict, num_steps: int | None = None
    ) -> OptimizerSettings:
        """The fields of a stage config (``optimizer`` -> ``kind``); ``num_steps``
        defaults to ``config.num_train_steps``."""
        return cls(
            learning_rate=config.learning_rate,
            num_steps=config.num_train_steps if num_steps is None else num_steps,
            warmup_steps=config.warmup_steps,
            final_lr_fraction=config.final_lr_fraction,
            weight_decay=config.weight_decay,
            grad_clip=config.grad_clip,
            kind=config.get("optimizer", "adamw"),
            momentum=config.get("momentum", None) or None,
            lr_scales=tuple((str(k), float(f)) for k, f in config.get("lr_scales", ())),
        )


def optimizer(s: OptimizerSettings) -> tuple[optax.GradientTransformation, Callable]:
    """Global-norm gradient clipping, then AdamW or SGD, with a linear warm-up + cosine
    decay schedule (Loshchilov and Hutter, ICLR 2019 / 2017).

    Returns:
      ``(tx, schedule)``.

    Raises:
      ValueError: an unknown ``kind``.
    """
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=s.learning_rate,
        warmup_steps=s.warmup_steps,
        decay_steps=max(s.num_steps, s.warmup_steps + 1),
        end_value=s.learning_rate * s.final_lr_fraction,
    )
    if s.kind == "adamw":
        opt = optax.adamw(schedule, weight_decay=s.weight_decay)
    elif s.kind == "sgd":
        opt = optax.sgd(schedule, momentum=s.momentum)
    else:
        raise ValueError(f"config.optimizer must be 'adamw' or 'sgd': {s.kind!r}")
    parts = [optax.clip_by_global_norm(s.grad_clip), opt]
    if s.lr_scales:
        parts.append(scale_by_path(s.lr_scales))
    return optax.chain(*parts), schedule


def scale_by_path(scales: Sequence[tuple[str, float]]) -> optax.GradientTransformation:
    """Multiplies the update of each parameter by the factor of the first
    ``(substring, factor)`` whose substring is in the parameter's path (1 if none)."""

    def factor(path: Any) -> float:
        key = jax.tree_util.keystr(path)
        return next((f for sub, f in scales if sub in key), 1.0)

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        scaled = jax.tree_util.tree_map_with_path(lambda p, u: u * factor(p), updates)
        return scaled, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, Any]:
    """`optimizer` with the settings of an autoencoder run config
    (`OptimizerSettings.from_config`).

    Returns:
      ``(tx, schedule)``.
    """
    return optimizer(OptimizerSettings.from_config(config))


# -------------------------------------------------------------------------- train step
def _ema_decay(decay: float, step: jax.Array) -> jax.Array:
    """EMA decay with the usual warm-up min(decay, (1 + t) / (10 + t)) (TensorFlow's
    ExponentialMovingAverage with ``num_updates``), so early averages are not dominated
    by the random initialisation."""
    t = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


def make_train_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    schedule: Callable | None = None,
    ema_decay: float = 0.0,
) -> Callable:
    """Pure train step ``(state, batch, key) -> (state, metrics)`` with a non-finite guard.

    ``state`` is ``{"params", "opt_state", "step"}`` plus, optionally, ``"ema_params"``
    (EMA of the parameters, updated with ``ema_decay``) and the counters ``"nonfinite"``
    (consecutive non-finite steps) and ``"nonfinite_total"``. The step's randomness is
    ``fold_in(key, step)``, so a resumed run replays the same randomness. A step whose
    loss or gradients are not finite leaves params, optimiser state and EMA unchanged
    (``jnp.where`` on the finite flag) but still advances ``step`` (one batch consumed).
    Not jitted here (the caller chooses jit / shardings, `train.parallel.jit_train_step`).

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> (loss [], metrics {name: []})``.
      tx: the optimizer.
      schedule: the learning-rate schedule, logged as ``lr`` when given.
      ema_decay: decay of the parameter EMA (used when the state holds ``ema_params``).

    Returns:
      ``train_step``; its metrics are those of ``loss_fn`` plus ``grad_norm``,
      ``grads_finite``, ``skipped`` (1.0 for a skipped step), ``lr`` and, with the
      counters in the state, ``nonfinite_run`` / ``nonfinite_total``.
    """

    def train_step(state, batch, key):
        step = state["step"]
        step_key = jax.random.fold_in(key, step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], batch, step_key
        )
        grads_finite = jnp.all(
            jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
        )
        finite = grads_finite & jnp.isfinite(loss)
        old = {k: state[k] for k in ("params", "opt_state", "ema_params") if k in state}

        def update(old):
            updates, opt_state = tx.update(grads, old["opt_state"], old["params"])
            params = optax.apply_updates(old["params"], updates)
            new = {"params": params, "opt_state": opt_state}
            if "ema_params" in old:
                d = _ema_decay(ema_decay, step)
                new["ema_params"] = jax.tree.map(
                    lambda e, p: d * e + (1.0 - d) * p, old["ema_params"], params
                )
            return new

        # A conditional, not a `where` per leaf on the global finite flag: the same
        # result, but XLA compiled the MP-20 step in 16 s instead of 36 s (2-core CPU).
        new = jax.lax.cond(finite, update, lambda old: old, old)
        new["step"] = step + 1
        metrics = dict(metrics)
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["grads_finite"] = grads_finite.astype(jnp.float32)
        metrics["skipped"] = (~finite).astype(jnp.float32)
        if "nonfinite" in state:
            bad = (~finite).astype(jnp.int32)
            new["nonfinite"] = jnp.where(finite, 0, state["nonfinite"] + 1)
            new["nonfinite_total"] = state["nonfinite_total"] + bad
            metrics["nonfinite_run"] = new["nonfinite"]
            metrics["nonfinite_total"] = new["nonfinite_total"]
        if schedule is not None:
            metrics["lr"] = schedule(step)
        return new, metrics

    return train_step


def initial_state(params: Any, tx: optax.GradientTransformation, ema: bool) -> dict[str, Any]:
    """The train state of `make_train_step` around given ``params`` (the one layout):
    ``params``, ``opt_state``, ``step`` [] int32, ``nonfinite`` and ``nonfinite_total`` []
    int32 (the guard's counters) and, with ``ema``, ``ema_params`` (= ``params``)."""
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "nonfinite": jnp.zeros((), jnp.int32),
        "nonfinite_total": jnp.zeros((), jnp.int32),
    }
    if ema:
        state["ema_params"] = jax.tree.map(jnp.copy, params)
    return state


# --------------------------------------------------------------------- bookkeeping
def mean_metrics(history: list[dict[str, Any]]) -> dict[str, float]:
    """Means over the logged steps; skipped (non-finite) steps are left out of every
    mean and counted in ``skipped``; counters keep their last value."""
    keys = history[0].keys()
    good = [h for h in history if not float(h.get("skipped", 0.0))] or history
    out = {}
    for k in keys:
        if k == "skipped":
            out[k] = float(sum(float(h[k]) for h in history))
        elif k.startswith("nonfinite"):
            out[k] = float(history[-1][k])
        else:
            out[k] = float(np.mean([float(h[k]) for h in good]))
    return out


def sync(name: str) -> None:
    """A barrier across processes (nothing with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class StopRequest:
    """SIGTERM / SIGINT set a flag that the train loop polls (it then saves and exits
    cleanly); a second SIGINT raises KeyboardInterrupt. Only in the main thread."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def requested(self, step: int, sync_every: int) -> bool:
        """Whether to stop now; with several processes the flags are combined every
        ``sync_every`` steps (every process must stop at the same step)."""
        if jax.process_count() == 1:
            return self.signal is not None
        if step % sync_every:
            return False
        flags = multihost_utils.process_allgather(np.int32(self.signal is not None))
        return bool(np.any(flags))


class Logger:
    """``metrics.jsonl`` (+ TensorBoard event files, tensorboardX), process 0 only.

    Args:
      workdir: folder of ``metrics.jsonl`` and ``tensorboard/``.
      enabled: write at all (process 0).
      tensorboard: also write event files for the ``train`` / ``val`` records.
      fresh: start a new ``metrics.jsonl`` instead of appending to it.
    """

    def __init__(
        self, workdir: Path, enabled: bool, tensorboard: bool = True, fresh: bool = False
    ) -> None:
        self.enabled = enabled
        mode = "w" if fresh else "a"
        self.file = open(workdir / "metrics.jsonl", mode) if enabled else None
        self.tb = SummaryWriter(str(workdir / "tensorboard")) if enabled and tensorboard else None

    def __call__(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(to_jsonable(record), default=float) + "\n")
        self.file.flush()
        if self.tb is not None and record.get("split") in ("train", "val"):
            for k, v in record.items():
                if k not in ("step", "split") and isinstance(v, int | float):
                    self.tb.add_scalar(f"{record['split']}/{k}", v, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


class Timer:
    """Wall-clock bookkeeping of a loop: the first step (compilation), the steady-state
    step time, and the side work (evaluation, checkpoints) left out of it."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.first_step_s: float | None = None
        self._loop: float | None = None
        self.side_s = 0.0

    def step_done(self, state: Any) -> None:
        """Call after every step; the first call waits for the device."""
        if self.first_step_s is None:
            jax.block_until_ready(state)
            self.first_step_s = time.perf_counter() - self.t0
            self._loop = time.perf_counter()

    @contextlib.contextmanager
    def side(self) -> Iterator[None]:
        """Times a block of side work."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.side_s += time.perf_counter() - t

    def step_s(self, n_steps: int) -> float:
        """Mean seconds per step after the first (NaN for fewer than 2 steps)."""
        if self._loop is None or n_steps < 2:
            return float("nan")
        return (time.perf_counter() - self._loop - self.side_s) / (n_steps - 1)


# ---------------------------------------------------------------------------- loop
def restore_state(ckpt: Checkpointer, abstract: Any) -> tuple[Any, dict[str, Any], int]:
    """The newest readable checkpoint onto the shardings of ``abstract`` (unreadable newer
    steps are reported and deleted: the resumed run writes them again).

    Returns:
      ``(state, meta, step)``.

    Raises:
      RuntimeError: no step is readable with this state layout.
    """
    out = ckpt.restore(abstract, delete_unreadable=True)
    if out is None:
        raise RuntimeError(
            f"no checkpoint in {ckpt.directory} is readable with this config (steps "
            f"{ckpt.steps()}; was the model config changed?); use a new workdir"
        )
    return out


class BatchSource(Protocol):
    """A resumable iterator of this process's batches (e.g. `autoperi_jax.graph.BatchIterator`)."""

    steps_per_epoch: int

    def __next__(self) -> Any: ...

    def state(self) -> dict[str, int]: ...

    def restore(self, state: dict[str, int]) -> None: ...


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """Typed loop settings (`run_loop`).

    Attributes:
      num_steps: the step to train up to.
      log_every: steps per ``train`` record (means over them).
      checkpoint_every: steps between checkpoints (also after every evaluation, at the
        end and on a stop request).
      max_nonfinite_steps: consecutive non-finite steps that stop the run.
      signal_sync_every: steps between combining stop requests across processes.
      best_metric: ``(checkpoint metric name, key of the evaluation record)``: the
        checkpoint after an evaluation carries it, for `Checkpointer`'s best step.
      progress: tqdm bar; ``desc`` its label, ``postfix`` {label: record key} shown on it.
    """

    num_steps: int
    log_every: int
    checkpoint_every: int
    max_nonfinite_steps: int = 10
    signal_sync_every: int = 10
    best_metric: tuple[str, str] | None = None
    progress: bool = True
    desc: str = "train"
    postfix: tuple[tuple[str, str], ...] = (("loss", "loss"),)


class LoopResult(NamedTuple):
    """What `run_loop` returns."""

    state: Any  # the train state after the last step
    last: dict[str, Any]  # {"train": last train record, "eval": last evaluation record}
    interrupted: int | None  # the signal that stopped the loop (-1: another process's)
    batch_shapes: int  # distinct batch shapes seen (compilations of the step)
    timer: Timer


def run_loop(
    state: Any,
    train_step: Callable[[Any, Any, jax.Array], tuple[Any, dict[str, Any]]],
    batches: BatchSource,
    key: jax.Array,
    mesh: Mesh,
    ckpt: Checkpointer,
    meta: Callable[[], dict[str, Any]],
    log: Logger,
    settings: LoopSettings,
    t_start: float,
    evaluate: Callable[[Any], dict[str, Any]] | None = None,
    eval_due: Callable[[int], bool] | None = None,
) -> LoopResult:
    """Trains from ``state["step"]`` up to ``settings.num_steps`` (module docstring).

    Args:
      state: the (replicated) train state of `make_train_step`, with its guard counters.
      train_step: the jitted step (`train.parallel.jit_train_step`).
      batches: this process's batches, positioned at ``state["step"]``.
      key: the stage's train key (step keys are ``fold_in(key, step)``).
      mesh: the device mesh; each local batch becomes a global array sharded over it.
      ckpt: where checkpoints go (the caller closes it).
      meta: ``() -> dict`` JSON metadata saved with each checkpoint (config, position...).
      log: the record sink.
      settings: `LoopSettings`.
      t_start: ``time.perf_counter()`` at the stage's start (records' ``time_s``).
      evaluate: ``evaluate(state) -> record``, run when ``eval_due(done)``.
      eval_due: ``eval_due(done) -> bool``.

    Returns:
      `LoopResult`.

    Raises:
      FloatingPointError: ``max_nonfinite_steps`` consecutive non-finite steps.
    """
    s, start, lead = settings, int(state["step"]), jax.process_index() == 0
    last: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    shapes: set[tuple[tuple[int, ...], ...]] = set()
    interrupted, prev, timer = None, None, Timer()

    def check_finite(done: int, metrics: dict[str, Any]) -> None:
        run = int(metrics["nonfinite_run"])
        if run >= s.max_nonfinite_steps:
            raise FloatingPointError(
                f"training stopped at step {done}: {run} consecutive steps (steps "
                f"{done - run + 1}..{done}) had a non-finite loss or gradient; they were "
                f"skipped ({int(metrics['nonfinite_total'])} in total). The last good "
                f"checkpoint is step {ckpt.latest_step()} in {ckpt.directory}."
            )

    bar = tqdm(
        range(start, s.num_steps), initial=start, total=s.num_steps,
        disable=not (s.progress and lead), desc=s.desc,
    )  # fmt: skip
    try:
        with StopRequest() as stop:
            for step in bar:
                local = next(batches)
                shapes.add(tuple(np.shape(x) for x in jax.tree.leaves(local)))
                state, metrics = train_step(state, parallel.global_batch(local, mesh), key)
                done = step + 1
                timer.step_done(state)
                if prev is not None:  # one step late: keeps the device queue busy
                    check_finite(*prev)
                prev = (done, metrics)
                history.append(metrics)
                if done % s.log_every == 0 or done == s.num_steps:
                    check_finite(*prev)
                    m = mean_metrics(jax.device_get(history))
                    history = []
                    m.update(step=done, split="train", time_s=time.perf_counter() - t_start)
                    m["epoch"] = done / batches.steps_per_epoch
                    log(m)
                    last["train"] = m
                    bar.set_postfix({k: f"{m[v]:.4f}" for k, v in s.postfix})
                with timer.side():
                    evaluated = evaluate is not None and eval_due(done)
                    if evaluated:
                        last["eval"] = evaluate(state)
                        last["eval"].update(
                            step=done, split="val", time_s=time.perf_counter() - t_start
                        )
                        log(last["eval"])
                    stopping = stop.requested(done, s.signal_sync_every)
                    due = done % s.checkpoint_every == 0 or done == s.num_steps
                    if evaluated or stopping or due:
                        check_finite(*prev)
                        scores = None
                        if evaluated and s.best_metric is not None:
                            scores = {s.best_metric[0]: last["eval"][s.best_metric[1]]}
                        ckpt.save(done, state, meta(), metrics=scores)
                if stopping:
                    interrupted = stop.signal if stop.signal is not None else -1
                    if lead:
                        print(f"stop requested: saved checkpoint at step {done}", flush=True)
                    break
            if prev is not None:
                check_finite(*prev)
    finally:
        bar.close()
    return LoopResult(state, last, interrupted, len(shapes), timer)
