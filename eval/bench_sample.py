"""Benchmark of the jitted sampler: network evaluations per sample and valid samples/s.

For each decoder step count (NFE: velocity evaluations of the coordinate decoder per
crystal, `autoperi_jax.model.make_decode_fn`) and batch size, loads the run's generator
(`autoperi_jax.load`), compiles ``sample_fn`` once (warm-up call, reported apart), then
times ``--repeats`` calls of ``sample_fn(params, fold_in(key, b), batch)`` to completion
(``block_until_ready``), and the host conversion to `Crystal` objects separately.
Validity is the CDVAE rule (`eval.metrics.structure_validity`: all distances >= 0.5 A
and volume >= 0.1 A^3; `eval.metrics.smact_validity`: SMACT 2.2.1 charge neutrality +
Pauling test), checked outside the timed region. Valid samples per second =
valid share x crystals per second of the sampler (device time only) and, in
``valid_per_s_with_host``, with the host conversion included.

Other network evaluations per crystal (fixed, independent of NFE): one pass of the
RealNVP (K couplings), the lattice, count, species and coordinate-guess heads, and the
property head. The connectivity classifier is not evaluated (its outputs are unused and
XLA drops them).

Usage::

    python -m eval.bench_sample --workdir runs/p5_c --num-steps 20,10,5,2,1 \\
        --batch-sizes 256,1024 --out runs/bench_sample.json
    # an accelerator image without pymatgen: time there, check validity where it is
    python -m eval.bench_sample --workdir autoperi_jax/pretrained/perov_5 --num-steps 5 \\
        --batch-sizes 256,1024,4096 --modes prior,plain --save S --out S/bench.json
    python -m eval.bench_sample --check S/*.extxyz
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path


def bench_one(
    workdir: str,
    num_steps: int,
    batch_size: int,
    repeats: int,
    seed: int,
    mode: str = "plain",
    save: str | None = None,
) -> dict:
    """Times one (NFE, batch size, mode) setting; returns a JSON-able record. ``mode``:
    ``plain`` (marginal flow, no symmetry layer) or ``prior`` (a space group drawn from
    the training distribution per crystal, then the symmetry layer). ``save``: also write
    the timed crystals to this extxyz file. Without pymatgen (an accelerator image with
    only the sampler's own dependencies) the validity fields are None: check the saved
    file where it is installed (``python -m eval.bench_sample --check FILE``)."""
    import jax

    from autoperi_jax import load
    from autoperi_jax.convert import outputs_to_crystals
    from autoperi_jax.crystal import write_structures
    from eval.metrics import crystal_validity

    gen = load(workdir, num_steps=num_steps, spacegroup_prior=(mode == "prior"))
    key = jax.random.PRNGKey(seed)
    t0 = time.perf_counter()
    jax.block_until_ready(gen.sample_fn(gen.params, jax.random.fold_in(key, 10_000), batch_size))
    compile_s = time.perf_counter() - t0
    device_s, host_s, crystals = 0.0, 0.0, []
    for b in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(
            gen.sample_fn(gen.params, jax.random.fold_in(key, b), batch_size)
        )
        t1 = time.perf_counter()
        crystals.extend(outputs_to_crystals(out, start=b * batch_size))
        t2 = time.perf_counter()
        device_s += t1 - t0
        host_s += t2 - t1
    n = len(crystals)
    if save:
        write_structures(crystals, save)
    record = {
        "mode": mode,
        "nfe": gen.nfe,
        "nfe_per_sample": gen.nfe_per_sample,
        "batch_size": batch_size,
        "n": n,
        "compile_s": compile_s,
        "sample_s": device_s,
        "host_s": host_s,
        "crystals_per_s": n / device_s,
        "device": str(jax.devices()[0]),
        "flow_layers": gen.flow_config.n_layers,
    }
    try:
        struct, comp = crystal_validity(crystals)
    except ModuleNotFoundError as e:  # pymatgen: validity left to --check
        print(f"bench_sample: no validity check here ({e}); see --check", file=sys.stderr)
        keys = ("struct_validity", "comp_validity", "validity", "valid_per_s",
                "valid_per_s_with_host")  # fmt: skip
        return {**record, **dict.fromkeys(keys)}
    valid = struct & comp
    return {
        **record,
        "struct_validity": float(struct.mean()),
        "comp_validity": float(comp.mean()),
        "validity": float(valid.mean()),
        "valid_per_s": float(valid.sum() / device_s),
        "valid_per_s_with_host": float(valid.sum() / (device_s + host_s)),
    }


def check(path: str) -> dict:
    """CDVAE validity of a file written with ``--save`` (where pymatgen is installed)."""
    from autoperi_jax.crystal import read_structures
    from eval.metrics import crystal_validity

    struct, comp = crystal_validity(read_structures(path))
    return {
        "file": path,
        "n": len(struct),
        "struct_validity": float(struct.mean()),
        "comp_validity": float(comp.mean()),
        "validity": float((struct & comp).mean()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/p5_c")
    p.add_argument("--num-steps", default="20,10,5,2,1", help="decoder Euler steps (NFE)")
    p.add_argument("--batch-sizes", default="256,1024")
    p.add_argument("--modes", default="plain,prior", help="plain and/or prior (see bench_one)")
    p.add_argument("--repeats", type=int, default=4, help="timed batches per setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the records as JSON")
    p.add_argument("--save", default=None,
                   help="folder: write each setting's crystals as MODE_nfeK_bB.extxyz")  # fmt: skip
    p.add_argument("--check", nargs="+", default=None, metavar="FILE",
                   help="only report the CDVAE validity of files written with --save")  # fmt: skip
    args = p.parse_args(argv)
    if args.check:
        for path in args.check:
            print(json.dumps(check(path)), flush=True)
        return 0
    import jax

    records = []
    for mode in args.modes.split(","):
        for ns in [int(s) for s in args.num_steps.split(",")]:
            for bs in [int(b) for b in args.batch_sizes.split(",")]:
                save = None
                if args.save:
                    Path(args.save).mkdir(parents=True, exist_ok=True)
                    save = str(Path(args.save) / f"{mode}_nfe{ns}_b{bs}.extxyz")
                r = bench_one(args.workdir, ns, bs, args.repeats, args.seed, mode, save)
                records.append(r)
                valid = (
                    "validity not checked here"
                    if r["validity"] is None
                    else f"validity {r['validity']:.3f} (struct {r['struct_validity']:.3f}, "
                    f"comp {r['comp_validity']:.3f}) -> {r['valid_per_s']:7.1f} valid/s "
                    f"({r['valid_per_s_with_host']:.1f} with host conversion)"
                )
                print(
                    f"{mode:5s} NFE {r['nfe']:3d} ({r['nfe_per_sample']:g} per sample)  "
                    f"batch {bs:5d}: {r['crystals_per_s']:7.1f} crystals/s on "
                    f"{r['device']}, {valid}; compile {r['compile_s']:.1f} s",
                    flush=True,
                )
    info = {
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "load_average": os.getloadavg(),
        "command": " ".join(sys.argv),
    }
    if args.out:
        Path(args.out).write_text(json.dumps({"info": info, "records": records}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
