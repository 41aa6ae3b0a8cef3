"""Writing generated crystals to files as they are drawn.

`write_samples` is what ``autoperi sample`` runs; call it from Python to write a
`autoperi_jax.api.Generator`'s crystals with sampler overrides the command line lacks::

  import jax, autoperi_jax
  from autoperi_jax.io import write_samples
  gen = autoperi_jax.load_pretrained("perov_5", temperature=1.0)
  write_samples(gen, jax.random.PRNGKey(1), 4000, "samples.extxyz")
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from autoperi_jax.crystal import Crystal, write_structures

__all__ = ["write_batches", "write_samples"]


def write_samples(
    gen,
    key,
    n: int,
    out: str | Path,
    conditions=None,
    spacegroup=None,
    batch_size: int = 256,
    temperature=None,
    progress: bool = True,
    unique: bool = False,
    max_batches: int | None = None,
) -> int:
    """Samples ``n`` crystals with a `autoperi_jax.api.Generator` and writes each finished
    batch at once: appended to an extxyz file (predicted properties in ``atoms.info``), or
    one CIF per crystal in a folder plus ``properties.csv``. An existing extxyz file is
    replaced; in a folder, earlier ``sample_*.cif`` files and ``properties.csv`` are
    removed first. ``unique`` / ``max_batches``: only mutually distinct crystals, fewer
    than n if the batches run out (`Generator.sample`). Returns the number written."""
    # arguments checked before the output is touched: a bad one loses nothing written
    batches = gen.sample_batches(
        key, n, conditions, spacegroup, batch_size, temperature, unique, max_batches
    )
    return write_batches(batches, out, n, progress, "sample", "sample_*.cif")


def write_batches(
    batches: Iterable[list[Crystal]],
    out: str | Path,
    total: int,
    progress: bool = True,
    desc: str = "sample",
    stale: str = "*.cif",
) -> int:
    """Writes each batch of crystals as it arrives: appended to an extxyz file, or one CIF
    per crystal in a folder plus ``properties.csv`` (the crystals' ``properties``). An
    existing extxyz file is replaced; in a folder the files matching ``stale`` and
    ``properties.csv`` are removed first. ``total`` sizes the progress bar. Returns the
    number of crystals written."""
    out = Path(out)
    is_file = out.suffix in (".xyz", ".extxyz")
    if is_file:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("")
    else:
        out.mkdir(parents=True, exist_ok=True)
        for f in out.glob(stale):
            f.unlink()
        (out / "properties.csv").unlink(missing_ok=True)
    written = 0
    bar = tqdm(total=total, disable=not progress, desc=desc, unit="crystal")
    for crystals in batches:
        write_structures(crystals, out, append=True)
        if not is_file:
            names = sorted({k for c in crystals for k in c.properties})
            csv = out / "properties.csv"
            with open(csv, "a") as f:
                if written == 0:
                    f.write(",".join(["name", *names]) + "\n")
                for c in crystals:
                    vals = [repr(c.properties.get(k, float("nan"))) for k in names]
                    f.write(",".join([c.name, *vals]) + "\n")
        written += len(crystals)
        bar.update(len(crystals))
    bar.close()
    return written
