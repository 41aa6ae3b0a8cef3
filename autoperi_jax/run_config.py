"""The edge between a training run's config document and the library's typed objects.

A run (``autoperi train``) stores its ml_collections config in every checkpoint
(`autoperi_jax.checkpoint.load_checkpoint`). These functions read it, once, at the edge:
``config.model`` gives the `Autoencoder`, ``config.objective`` the `ModelSettings`,
``config.data`` the `GraphSettings` and the dataset splits. Everything past them receives
typed fields, never the config (DESIGN: configs at the edge). Used by the trainer, the
flow stage and `autoperi_jax.reconstruct.reconstruct_run`.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from autoperi_jax.datasets import GraphDataset, load_dataset
from autoperi_jax.graph import GraphSettings
from autoperi_jax.model import ModelSettings
from autoperi_jax.nn import Autoencoder

__all__ = ["build_model", "build_settings", "graph_settings", "load_split"]


def build_model(config: ml_collections.ConfigDict) -> Autoencoder:
    """The `Autoencoder` described by ``config.model`` (its fields, by name).

    Raises:
      ValueError: ``config.model`` names a field the `Autoencoder` does not have.
    """
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
    """The input graph of ``config.data`` (``cutoff`` [A], ``max_neighbors``)."""
    return GraphSettings(cutoff=config.data.cutoff, max_neighbors=config.data.max_neighbors)


def load_split(
    config: ml_collections.ConfigDict, split: str, progress: bool = True
) -> GraphDataset:
    """`load_dataset` of ``config.data.dataset`` and ``split`` with the config's graph,
    cut to ``config.data.limit_SPLIT`` crystals when that is set.

    Raises:
      ValueError: a crystal has more atoms than ``config.model.max_atoms``.
    """
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
