"""Linen modules of the periodic autoencoder (embeddings, radial basis, equivariant
periodic message passing, encoder, decoders)."""

from autoperi_jax.nn.autoencoder import Autoencoder
from autoperi_jax.nn.decoder import (
    CompositionDecoder,
    ConnectivityDecoder,
    LatticeDecoder,
    VelocityField,
    VelocityInputs,
)
from autoperi_jax.nn.embeddings import (
    IMAGE_EMBEDDINGS,
    ImageEmbedding,
    SpeciesEmbedding,
    TimeEmbedding,
)
from autoperi_jax.nn.encoder import Encoder, lattice_invariants
from autoperi_jax.nn.message_passing import PeriodicGNN, PeriodicInteraction, edge_geometry
from autoperi_jax.nn.radial import RadialEmbedding, bessel_basis, polynomial_envelope

__all__ = [
    "IMAGE_EMBEDDINGS",
    "Autoencoder",
    "CompositionDecoder",
    "ConnectivityDecoder",
    "Encoder",
    "ImageEmbedding",
    "LatticeDecoder",
    "PeriodicGNN",
    "PeriodicInteraction",
    "RadialEmbedding",
    "SpeciesEmbedding",
    "TimeEmbedding",
    "VelocityField",
    "VelocityInputs",
    "bessel_basis",
    "edge_geometry",
    "lattice_invariants",
    "polynomial_envelope",
]
