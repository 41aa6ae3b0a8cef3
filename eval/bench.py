"""``autoperi bench``: one command for the speed figures people ask for, as JSON + Markdown.

Sections (each also runnable alone through its module):

* ``data`` (`eval.bench_data`): cold preprocessing of every Perov-5 structure vs loading
  the cache, and the padding waste of training batches;
* ``train`` (`train.bench`, run as a script in a subprocess per device count): training crystals/s,
  seconds per epoch, train-step compilations per epoch and their compile time;
* ``sample`` (`eval.bench_sample.bench_one`): NFE per sample and valid crystals/s of the
  model (shipped or a run) without and with the space-group prior, plus the number of
  ``sample_fn`` compilations (counted with `jax.monitoring`);
* ``batch_scaling``: sampler time per crystal against batch size (same model);
* ``atom_scaling``: decoder time per crystal against atoms per cell (5 to 20 slots), with
  untrained weights of the shipped architecture (cost depends on shapes only; every slot
  filled, cubic cells at 12 A^3 per atom, in-jit edge budget 20 per atom).

Times are wall-clock on whatever machine runs it (recorded in ``info``); compare ratios
from one run, not numbers across machines. Usage::

  autoperi bench --out bench.json              # writes bench.json and bench.md
  autoperi bench --out bench.json --quick      # fewer repeats and settings (~3 min)
  autoperi bench --sections sample,atom_scaling --workdir runs/p5_c --out b.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from autoperi_jax.commands import add_model_source, model_source

__all__ = [
    "SECTIONS",
    "atom_scaling",
    "batch_scaling",
    "count_compiles",
    "markdown",
    "register",
    "run",
]

SECTIONS = ("data", "train", "sample", "batch_scaling", "atom_scaling")
ROOT = Path(__file__).resolve().parents[1]


def count_compiles() -> list[tuple[str, float]]:
    """A list that from now on receives ``(function name, seconds)`` for every XLA backend
    compilation in this process (`jax.monitoring` event
    ``/jax/core/compile/backend_compile_duration``)."""
    import jax.monitoring  # lazy, as every jax import here: --help builds this parser

    compiles: list[tuple[str, float]] = []

    def listener(event: str, duration: float, **kw: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append((str(kw.get("fun_name", "")), float(duration)))

    jax.monitoring.register_event_duration_secs_listener(listener)
    return compiles


def _time(fn, repeats: int) -> float:
    """Seconds per call of ``fn()`` (blocked), after one warm-up call."""
    import jax

    jax.block_until_ready(fn())
    t = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn())
    return (time.perf_counter() - t) / repeats


def batch_scaling(model_dir: Path, batch_sizes: list[int], repeats: int, nfe: int) -> list:
    """Sampler seconds per crystal against batch size (marginal flow, no symmetry layer)."""
    import jax

    from autoperi_jax.api import load

    gen = load(model_dir, num_steps=nfe, spacegroup_prior=False)
    out = []
    for bs in batch_sizes:
        key = jax.random.PRNGKey(bs)
        s = _time(lambda: gen.sample_fn(gen.params, key, bs), repeats)  # noqa: B023
        out.append({"batch_size": bs, "call_s": s, "ms_per_crystal": 1e3 * s / bs})
    return out


def atom_scaling(
    model_dir: Path, atoms: list[int], batch_size: int, repeats: int, nfe: int
) -> list:
    """Decoder and training seconds per crystal against atom slots per cell (untrained
    weights of the shipped architecture; every slot filled; 12 A^3 per atom).

    The decoder: one `make_decode_fn` call (``nfe`` Euler steps) on ``batch_size`` latents;
    training: one jitted loss + gradient (`autoperi_jax.loss.make_loss_fn`) on a padded
    batch of ``batch_size`` random crystals of that size. Both exclude compilation."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from autoperi_jax.api import load
    from autoperi_jax.graph import GraphSettings
    from autoperi_jax.loss import make_loss_fn
    from autoperi_jax.model import init_params, make_decode_fn
    from autoperi_jax.testing import random_batch

    ref = load(model_dir)
    out = []
    for n in atoms:
        model = dataclasses.replace(ref.model, max_atoms=n)
        settings = dataclasses.replace(
            ref.settings,
            max_atoms=n,
            num_steps=nfe,
            flow_edges_per_crystal=20 * n,
            connect_edges_per_crystal=20 * n,
        )
        rng = np.random.default_rng(n)
        gs = GraphSettings(cutoff=ref.graph_cutoff, max_neighbors=ref.graph_max_neighbors)
        side = (12.0 * n) ** (1 / 3)  # A: 12 A^3 per atom
        example, _ = random_batch(
            rng, 2, gs, n_atoms=n, length_range=(side, 1.2 * side), min_distance=0.8
        )
        example = jax.tree.map(jnp.asarray, example)
        params = jax.jit(lambda k, b: init_params(model, b, settings, k))(  # noqa: B023
            jax.random.PRNGKey(0), example
        )
        decode = jax.jit(make_decode_fn(model, settings, ref.normalisers))
        z = jax.random.normal(jax.random.PRNGKey(1), (batch_size, ref.flow_config.dim))
        cell = jnp.broadcast_to(jnp.eye(3) * side, (batch_size, 3, 3))
        n_atoms = jnp.full((batch_size,), n, jnp.int32)
        numbers = jnp.asarray(rng.choice([8, 22, 38, 56], (batch_size, n)), jnp.int32)
        key = jax.random.PRNGKey(2)
        s = _time(lambda: decode(params, z, key, None, cell, n_atoms, numbers), repeats)  # noqa: B023
        train_batch, _ = random_batch(
            rng, batch_size, gs, n_atoms=n, length_range=(side, 1.2 * side), min_distance=0.8
        )
        train_batch = jax.tree.map(jnp.asarray, train_batch)
        grad = jax.jit(
            jax.value_and_grad(make_loss_fn(model, settings, ref.normalisers), has_aux=True)
        )
        t = _time(lambda: grad(params, train_batch, key), repeats)  # noqa: B023
        out.append(
            {
                "atoms": n,
                "call_s": s,
                "ms_per_crystal": 1e3 * s / batch_size,
                "train_ms_per_crystal": 1e3 * t / batch_size,
            }
        )
    return out


def _train_section(steps: int) -> list:
    cmd = [sys.executable, str(ROOT / "train" / "bench.py"), "--steps", str(steps)]
    cmd += ["--devices", "1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"bench_train failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> int:
    """Runs ``autoperi bench``; returns the exit code."""
    import jax

    from eval.bench_sample import bench_one

    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    model_dir = model_source(args)
    quick = args.quick
    repeats = 2 if quick else 4
    result: dict[str, Any] = {
        "info": {
            "machine": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "jax_backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()],
            "load_average_start": os.getloadavg(),
            "model": str(model_dir),
            "command": "autoperi " + " ".join(sys.argv[1:]),
            "quick": quick,
        }
    }
    t0 = time.perf_counter()
    compiles = count_compiles()
    if "data" in sections:
        from eval.bench_data import main as bench_data

        print("bench: data (preprocess Perov-5 cold, then from the cache)", flush=True)
        result["data"] = bench_data(["--out", os.devnull])
    if "train" in sections:
        print("bench: train (Perov-5, default config, 1 device)", flush=True)
        result["train"] = _train_section(10 if quick else 30)
    if "sample" in sections:
        recs = []
        for mode in ("plain", "prior"):
            print(f"bench: sample ({mode})", flush=True)
            n0 = len(compiles)
            r = bench_one(str(model_dir), args.nfe, 256, repeats, 0, mode)
            r["sample_fn_compiles"] = sum("sample" in name for name, _ in compiles[n0:])
            recs.append(r)
        result["sample"] = recs
    if "batch_scaling" in sections:
        print("bench: sampler time vs batch size", flush=True)
        sizes = [16, 64, 256] if quick else [16, 64, 256, 1024]
        result["batch_scaling"] = batch_scaling(model_dir, sizes, repeats, args.nfe)
    if "atom_scaling" in sections:
        print("bench: decoder time vs atoms per cell", flush=True)
        atoms = [int(a) for a in args.atoms.split(",")]
        result["atom_scaling"] = atom_scaling(model_dir, atoms, 64, repeats, args.nfe)
    result["info"]["wall_s"] = time.perf_counter() - t0
    result["info"]["load_average_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))
    md = markdown(result)
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def markdown(result: dict) -> str:
    """The benchmark as Markdown tables."""
    info = result["info"]
    lines = [
        "# autoperi bench",
        "",
        f"`{info['command']}` on {info['machine']}, {info['cpu_count']} CPUs, JAX backend "
        f"{info['jax_backend']}; load average at start {info['load_average_start'][0]:.1f}; "
        f"wall time {info.get('wall_s', 0):.0f} s. Compare ratios within one run.",
        "",
        "| measure | value |",
        "|---|---|",
    ]
    d = result.get("data")
    if d:
        lines += [
            f"| preprocess {d['structures']} Perov-5 structures, cold / cached | "
            f"{d['cold_preprocess_s']:.1f} s / {d['cached_load_s']:.2f} s "
            f"({d['cache_speedup']:.0f}x) |",
            f"| padding waste, train batches (nodes / edges) | "
            f"{100 * d['padding_waste_nodes']:.1f} % / {100 * d['padding_waste_edges']:.1f} % |",
        ]
    for r in result.get("train", []):
        lines += [
            f"| training, {r['devices']} device(s), batch {r['batch_size']} | "
            f"{r['crystals_per_s']:.0f} crystals/s, {r['step_s']:.3f} s/step, "
            f"{r['epoch_s']:.0f} s/epoch |",
            f"| train-step compilations per epoch (padding buckets) | "
            f"{r['compilations_per_epoch']} ({r['compile_s']:.1f} s compiling) |",
        ]
    for r in result.get("sample", []):
        what = "no space-group prior" if r["mode"] == "plain" else "space-group prior + symmetry"
        lines += [
            f"| sampling, {what}, batch {r['batch_size']} | {r['valid_per_s']:.1f} valid "
            f"crystals/s ({r['crystals_per_s']:.1f} crystals/s x validity "
            f"{r['validity']:.3f}); NFE {r['nfe_per_sample']:g} per sample ({r['nfe']} "
            f"per decoded candidate); "
            f"{r['sample_fn_compiles']} compilation(s) |"
        ]
    if result.get("batch_scaling"):
        lines += ["", "Sampler time per crystal vs batch size:", ""]
        lines += ["| batch size | ms per crystal | call (s) |", "|---|---|---|"]
        for r in result["batch_scaling"]:
            lines.append(f"| {r['batch_size']} | {r['ms_per_crystal']:.2f} | {r['call_s']:.3f} |")
    if result.get("atom_scaling"):
        base = result["atom_scaling"][0]["ms_per_crystal"]
        tbase = result["atom_scaling"][0].get("train_ms_per_crystal")
        lines += ["", "Cost per crystal vs atoms per cell (untrained weights):", ""]
        lines += [
            "| atoms | decoder ms per crystal | relative | train ms per crystal | relative |",
            "|---|---|---|---|---|",
        ]
        for r in result["atom_scaling"]:
            train = r.get("train_ms_per_crystal")
            cells = "| - | - |" if train is None else f"| {train:.2f} | {train / tbase:.2f}x |"
            lines.append(
                f"| {r['atoms']} | {r['ms_per_crystal']:.2f} | {r['ms_per_crystal'] / base:.2f}x "
                + cells
            )
    return "\n".join(lines) + "\n"


def register(subparsers) -> argparse.ArgumentParser:
    """Adds ``bench`` to the root parser."""
    p = subparsers.add_parser(
        "bench",
        help="training / sampling speed, compilations, padding waste, scaling (JSON + Markdown)",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  autoperi bench --pretrained perov_5 --out bench.json\n"
        "  autoperi bench --pretrained perov_5 --out bench.json --quick\n"
        "  autoperi bench --workdir runs/p5_c --sections sample,batch_scaling --out b.json",
    )
    add_model_source(p, "run folder with flow/model (default: --pretrained perov_5)", False)
    p.add_argument("--out", required=True, help="JSON file (the Markdown goes beside it)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    p.add_argument("--nfe", type=int, default=5, help="decoder Euler steps per sample")
    p.add_argument("--quick", action="store_true", help="fewer repeats and settings")
    p.add_argument(
        "--atoms", default="5,10,20,52", help="atoms per cell of atom_scaling (comma-separated)"
    )
    # compilations are part of what it measures: no persistent compilation cache
    p.set_defaults(func=run, xla_cache=False)
    return p
