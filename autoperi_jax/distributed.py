"""Multi-process JAX start-up, from command-line flags or environment variables.

In the library because the ``autoperi`` command line (`autoperi_jax.cli`) must initialise
`jax.distributed` before any plugin is imported or any JAX computation runs; the trainer
(`train.parallel` re-exports it) calls it again, which is then a no-op.
"""

from __future__ import annotations

import os

import jax

__all__ = ["maybe_initialize_distributed"]


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Initialises multi-process JAX when asked to, from flags or environment variables.

    Reads ``AUTOPERI_COORDINATOR`` (or ``JAX_COORDINATOR_ADDRESS``), ``AUTOPERI_NUM_PROCESSES``
    and ``AUTOPERI_PROCESS_ID`` when the arguments are ``None``. On CPU the gloo collectives
    are enabled first (needed for cross-process all-reduce on CPU). Call before any other JAX
    work. On TPU pods / SLURM, ``jax.distributed.initialize()`` auto-detects everything:
    set ``AUTOPERI_DISTRIBUTED=auto`` for that.

    Returns:
      True if JAX was initialised for several processes.
    """
    if jax.distributed.is_initialized():  # done earlier (autoperi_jax.cli, before the parser)
        return True
    env = os.environ
    if env.get("AUTOPERI_DISTRIBUTED") == "auto":
        jax.distributed.initialize()
        return True
    addr = (
        coordinator_address or env.get("AUTOPERI_COORDINATOR") or env.get("JAX_COORDINATOR_ADDRESS")
    )
    if not addr:
        return False
    n = num_processes if num_processes is not None else int(env["AUTOPERI_NUM_PROCESSES"])
    pid = process_id if process_id is not None else int(env["AUTOPERI_PROCESS_ID"])
    # Cross-process collectives of the CPU backend (harmless when accelerators are used).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=addr, num_processes=n, process_id=pid)
    return True
