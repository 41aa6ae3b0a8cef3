"""autoperi-jax: periodic-graph crystal generative modelling in JAX.

Light at import: heavy dependencies (jax, pymatgen) load when a submodule needs them, so
data-loading worker processes start fast.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Crystal": "autoperi_jax.crystal",
    "CrystalError": "autoperi_jax.crystal",
    "read_structures": "autoperi_jax.crystal",
    "write_structures": "autoperi_jax.crystal",
    "cell_to_lattice_params": "autoperi_jax.crystal",
    "lattice_params_to_cell": "autoperi_jax.crystal",
    "GraphSettings": "autoperi_jax.graph",
    "neighbor_list": "autoperi_jax.graph",
    "batch_graphs": "autoperi_jax.graph",
    "BatchIterator": "autoperi_jax.graph",
    "load_dataset": "autoperi_jax.datasets",
    "GraphDataset": "autoperi_jax.datasets",
    "load": "autoperi_jax.api",
    "Generator": "autoperi_jax.api",
    "load_pretrained": "autoperi_jax.api",
    "available_pretrained": "autoperi_jax.api",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'autoperi_jax' has no attribute {name!r}")
