"""Training throughput benchmark: Perov-5 with the default ``perov_5`` config on this machine.

Usage::

  python train/bench.py --steps 30 --devices 1 2 [--out bench_train.json]
      [--config train/configs/perov_5.py] [--config.KEY=VALUE ...]

For every device count a worker subprocess starts with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (forced host devices: the CPU is split
into N XLA devices, the data axis of `train.parallel`), builds exactly what
`train.trainer.train_and_evaluate` builds (mesh, sharded `BatchIterator`, state through
`parallel.create_state`, the donated `parallel.jit_train_step` of `make_train_step`), and
measures:

* ``compilations_per_epoch``: distinct padded batch shapes in one epoch of the train split
  (one train-step compilation each; later epochs reuse them), from a host pass over an epoch;
* ``train_step_compiles`` / ``compile_s``: backend compilations of the train step counted with
  `jax.monitoring` (event ``/jax/core/compile/backend_compile_duration``) while warming up the
  shapes the timed window uses, and their total duration; ``init_s``: state creation
  (tracing + compiling + running the initialiser);
* ``step_s``: wall time per step over ``--steps`` steps after warm-up (host batching +
  transfer + compute, as in training; no compilation inside: checked), ``crystals_per_s`` =
  batch_size / step_s, ``epoch_s`` = steps_per_epoch x step_s against the 60 s target
  (issue 6: an epoch of the 11,356 Perov-5 training crystals in under 60 s on 2 CPU cores);
* ``host_batch_s``: host time to build one padded global batch.

The last line of the output is a JSON list with one record per device count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from eval.bench import count_compiles

ROOT = Path(__file__).resolve().parents[1]
TARGET_EPOCH_S = 60.0


def _worker(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    # lazy: the parent process only starts workers and needs none of this (jax, the model)
    import jax
    import numpy as np

    compiles = count_compiles()

    from autoperi_jax.loss import make_loss_fn
    from autoperi_jax.model import compute_normalisers
    from autoperi_jax.reconstruct import ordered_batches as _ordered_batches
    from train import parallel
    from train.cli import apply_overrides, load_config
    from train.trainer import (
        _num_shards,
        build_model,
        build_settings,
        load_split,
        make_batch_iterator,
        make_init_state,
        make_optimizer,
        make_train_step,
    )

    config = apply_overrides(load_config(args.config), overrides)
    t = time.perf_counter()
    ds = load_split(config, "train", progress=False)
    load_s = time.perf_counter() - t
    mesh = parallel.make_mesh()
    num_shards = _num_shards(config, mesh.size, jax.process_count())

    def iterator():
        return make_batch_iterator(config, ds.graphs, num_shards)

    def shape(b) -> tuple[int, ...]:
        slots = b.globals.get("slot_mask")
        width = () if slots is None else (slots.shape[-1],)
        return tuple(b.nodes["mask"].shape) + tuple(b.edges["mask"].shape) + width

    # One epoch on the host: its distinct shapes are the train-step compilations per epoch.
    it = iterator()
    t = time.perf_counter()
    epoch_shapes = [shape(next(it)) for _ in range(it.steps_per_epoch)]
    host_batch_s = (time.perf_counter() - t) / it.steps_per_epoch

    model, settings = build_model(config), build_settings(config)
    tx, schedule = make_optimizer(config)
    normalisers = compute_normalisers(ds.graphs)
    example = next(iter(_ordered_batches(ds.graphs[:2], 2)))[0]
    key = jax.random.PRNGKey(config.seed)

    ema_decay = float(config.get("ema_decay", 0.0))
    init_state = make_init_state(model, settings, tx, ema_decay)

    t = time.perf_counter()
    state = parallel.create_state(init_state, mesh, key, example)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t
    loss_fn = parallel.sharded_loss(make_loss_fn(model, settings, normalisers))
    step = parallel.jit_train_step(make_train_step(loss_fn, tx, schedule, ema_decay), mesh)

    # Warm up every shape of the timed window (one compilation each), then time it.
    it = iterator()
    window = [next(it) for _ in range(args.steps)]
    timed = sorted({shape(b) for b in window})
    first = {}
    for b in window:
        first.setdefault(shape(b), b)
    n0 = len(compiles)
    warm = {}
    for s in timed:
        t = time.perf_counter()
        state, m = step(state, parallel.global_batch(first[s], mesh), key)
        jax.block_until_ready(state)
        warm[str(s)] = time.perf_counter() - t
    step_compiles = [c for c in compiles[n0:] if "train_step" in c[0]]

    n1 = len(compiles)
    it = iterator()
    t = time.perf_counter()
    for _ in range(args.steps):
        state, m = step(state, parallel.global_batch(next(it), mesh), key)
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - t
    assert len(compiles) == n1, f"compilation inside the timed loop: {compiles[n1:]}"
    assert np.isfinite(float(m["loss"]))
    step_s = elapsed / args.steps
    return {
        "devices": mesh.size,
        "num_shards": num_shards,
        "batch_size": config.batch_size,
        "n_train": len(ds.graphs),
        "steps_per_epoch": it.steps_per_epoch,
        "timed_steps": args.steps,
        "step_s": step_s,
        "crystals_per_s": config.batch_size / step_s,
        "epoch_s": it.steps_per_epoch * step_s,
        "target_epoch_s": TARGET_EPOCH_S,
        "meets_target": it.steps_per_epoch * step_s < TARGET_EPOCH_S,
        "compilations_per_epoch": len(set(epoch_shapes)),
        "buckets": [(b.n_node, b.n_edge, b.n_graph) for b in it.buckets],
        "shapes_in_window": len(timed),
        "train_step_compiles": len(step_compiles),
        "compile_s": sum(d for _, d in step_compiles),
        "first_call_s": warm,
        "init_s": init_s,
        "host_batch_s": host_batch_s,
        "load_s": load_s,
        "cpu_count": os.cpu_count(),
        "loadavg_1min": os.getloadavg()[0],
        "platform": jax.devices()[0].platform,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per device count")
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    p.add_argument("--config", default=str(ROOT / "train" / "configs" / "perov_5.py"))
    p.add_argument("--out", default=None, help="also write the JSON records here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(rest)
    if args.worker:
        print(json.dumps(_worker(args, overrides)))
        return 0
    results = []
    for n in args.devices:
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--steps",
               str(args.steps), "--config", args.config, *overrides]  # fmt: skip
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-4000:], file=sys.stderr)
            return proc.returncode
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["worker_wall_s"] = time.perf_counter() - t
        results.append(r)
        print(
            f"{r['devices']} device(s), {r['num_shards']} shard(s), batch {r['batch_size']}: "
            f"{r['step_s']:.3f} s/step, {r['crystals_per_s']:.1f} crystals/s, epoch "
            f"{r['epoch_s']:.1f} s ({r['steps_per_epoch']} steps; target "
            f"{TARGET_EPOCH_S:.0f} s: {'met' if r['meets_target'] else 'missed'}); "
            f"{r['compilations_per_epoch']} compilations per epoch, train-step compile "
            f"{r['compile_s']:.1f} s for {r['train_step_compiles']} shape(s), init "
            f"{r['init_s']:.1f} s, host batching {r['host_batch_s'] * 1e3:.0f} ms/batch "
            f"(load average {r['loadavg_1min']:.1f} on {r['cpu_count']} CPUs)",
            flush=True,
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
