"""A chunked process-pool map with a progress bar, used by the evaluation code and
`autoperi csp --rank` (a light module: the standard library and tqdm).

Work is cut into chunks; each chunk runs ``fn(chunk)`` in a worker process started with the
``forkserver`` method (``spawn`` where forkserver does not exist), never ``fork``: the parent
may hold JAX or BLAS thread pools that must not be forked. If the pool cannot start (for
example when ``__main__`` is not importable) or dies, the remaining chunks run serially in
this process, with a warning.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

__all__ = ["default_workers", "parallel_map"]


def default_workers(workers: int | None) -> int:
    """``workers`` if given, else every core this process may use."""
    if workers is not None:
        return max(1, int(workers))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[s : s + size]) for s in range(0, len(items), size)]


def parallel_map(
    fn: Callable[[list[T]], list[R]],
    items: Sequence[T],
    workers: int | None = None,
    chunk_size: int = 32,
    desc: str = "",
    progress: bool = True,
    unit: str = "it",
) -> list[R]:
    """Applies ``fn`` to chunks of ``items`` on ``workers`` processes, keeping the order.

    Args:
      fn: a module-level (picklable) function mapping a list of items to a list of results
        of the same length.
      items: the inputs.
      workers: processes (default: every usable core); 1 runs in this process.
      chunk_size: items per task.
      desc: progress-bar label.
      progress: show a tqdm progress bar.
      unit: progress-bar unit.

    Returns:
      ``[fn([x])[0] for x in items]``, computed chunk-wise.
    """
    from tqdm.auto import tqdm

    chunks = _chunks(items, max(1, chunk_size))
    results: list[list[R] | None] = [None] * len(chunks)
    workers = default_workers(workers)
    bar = tqdm(total=len(items), desc=desc, unit=unit, disable=not progress, leave=False)
    if workers > 1 and len(chunks) > 1:
        method = (
            "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        )
        try:
            ctx = multiprocessing.get_context(method)
            with cf.ProcessPoolExecutor(
                max_workers=min(workers, len(chunks)), mp_context=ctx
            ) as ex:
                futures = {ex.submit(fn, c): k for k, c in enumerate(chunks)}
                for fut in cf.as_completed(futures):
                    k = futures[fut]
                    results[k] = fut.result()
                    bar.update(len(chunks[k]))
        except (cf.process.BrokenProcessPool, OSError) as e:
            warnings.warn(
                f"worker processes failed ({type(e).__name__}: {e}); finishing on one core",
                stacklevel=2,
            )
    for k, c in enumerate(chunks):
        if results[k] is None:
            results[k] = fn(c)
            bar.update(len(c))
    bar.close()
    out: list[R] = []
    for k, r in enumerate(results):
        assert r is not None and len(r) == len(chunks[k]), "fn must return one result per item"
        out.extend(r)
    return out
