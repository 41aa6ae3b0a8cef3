"""The periodic autoencoder: encoder, lattice / composition / coordinate / bond decoders.

`Autoencoder` only holds the modules; the losses, the flow-matching interpolant and the
decoding loop are pure functions in `autoperi_jax.model`. Call the parts with
``model.apply(params, ..., method=Autoencoder.encode)`` etc.; ``model.init`` runs
`Autoencoder.__call__`, which touches every part once.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from autoperi_jax.nn.decoder import (
    CompositionDecoder,
    ConnectivityDecoder,
    CoordinateGuess,
    LatticeDecoder,
    VelocityField,
    VelocityInputs,
)
from autoperi_jax.nn.encoder import Encoder
from autoperi_jax.nn.message_passing import PeriodicGNN

__all__ = ["Autoencoder"]


class Autoencoder(nn.Module):
    """Equivariant periodic autoencoder (method section 2.3).

    Attributes:
      max_atoms: static number of atom slots A of the decoder.
      image_embedding: f(k_ij) option of both GNNs (`autoperi_jax.nn.embeddings`).
      enc_layers, enc_irreps, enc_cutoff, enc_avg_neighbors: encoder GNN.
      dec_layers, dec_irreps, dec_cutoff, dec_avg_neighbors: velocity-field GNN.
      sh_lmax: spherical-harmonic degree of both GNNs.
      edge_channels: multiplicity of the edge features in the tensor products.
      image_features: width of f(k_ij).
      num_basis: radial basis size.
      mlp_hidden: width of edge MLPs.
      embed_features: species embedding width.
      head_hidden: width of latent heads and decoders.
      latent_lattice, latent_comp, latent_struct: sizes of z's parts.
      posterior: ``'deterministic'`` or ``'gaussian'`` (`autoperi_jax.nn.encoder`).
      connect_cutoff: distance range (A) of the bond classifier.
      dec_global_context: graph-mean features in every velocity-field layer.
      self_condition: the velocity field also reads its previous end-point prediction
        (self-conditioning, Chen et al., "Analog Bits", ICLR 2023).
      composition_head: ``'slots'`` (species per sorted slot) or ``'fractions'``
        (element fractions, rounded to the atom count; the encoder's z_comp head then
        reads the composition alone, so z_comp is a code of the composition);
        `autoperi_jax.nn.decoder.CompositionDecoder`.
    """

    max_atoms: int = 20
    image_embedding: str = "self_image"
    enc_layers: int = 3
    enc_irreps: str = "64x0e+16x1o+8x2e"
    enc_cutoff: float = 6.0
    enc_avg_neighbors: float = 12.0
    dec_layers: int = 3
    dec_irreps: str = "64x0e+16x1o+8x2e"
    dec_cutoff: float = 5.0
    dec_avg_neighbors: float = 16.0
    sh_lmax: int = 2
    edge_channels: int = 16
    image_features: int = 16
    num_basis: int = 8
    mlp_hidden: int = 64
    embed_features: int = 64
    head_hidden: int = 128
    latent_lattice: int = 8
    latent_comp: int = 32
    latent_struct: int = 32
    posterior: str = "deterministic"
    connect_cutoff: float = 5.0
    dec_global_context: bool = False
    self_condition: bool = False
    composition_head: str = "slots"

    def setup(self) -> None:
        enc_gnn = PeriodicGNN(
            num_layers=self.enc_layers,
            hidden_irreps=self.enc_irreps,
            sh_lmax=self.sh_lmax,
            num_basis=self.num_basis,
            cutoff=self.enc_cutoff,
            mlp_hidden=self.mlp_hidden,
            avg_num_neighbors=self.enc_avg_neighbors,
            image_embedding=self.image_embedding,
            image_features=self.image_features,
            edge_channels=self.edge_channels,
        )
        dec_gnn = PeriodicGNN(
            num_layers=self.dec_layers,
            hidden_irreps=self.dec_irreps,
            sh_lmax=self.sh_lmax,
            num_basis=self.num_basis,
            cutoff=self.dec_cutoff,
            mlp_hidden=self.mlp_hidden,
            avg_num_neighbors=self.dec_avg_neighbors,
            image_embedding=self.image_embedding,
            image_features=self.image_features,
            edge_channels=self.edge_channels,
            global_context=self.dec_global_context,
        )
        self.encoder = Encoder(
            gnn=enc_gnn,
            embed_features=self.embed_features,
            head_hidden=self.head_hidden,
            latent_lattice=self.latent_lattice,
            latent_comp=self.latent_comp,
            latent_struct=self.latent_struct,
            posterior=self.posterior,
            composition_fractions=self.composition_head == "fractions",
        )
        self.lattice_decoder = LatticeDecoder(self.head_hidden)
        self.composition_decoder = CompositionDecoder(
            self.max_atoms, self.head_hidden, self.composition_head
        )
        self.velocity_field = VelocityField(
            gnn=dec_gnn, embed_features=self.embed_features, cond_features=self.embed_features
        )
        self.connectivity_decoder = ConnectivityDecoder(self.mlp_hidden, self.connect_cutoff)
        self.coordinate_guess = CoordinateGuess(self.max_atoms, self.head_hidden)

    @property
    def latent_sizes(self) -> dict[str, int]:
        return {
            "z_lattice": self.latent_lattice,
            "z_comp": self.latent_comp,
            "z_struct": self.latent_struct,
        }

    def split_latent(self, z: jnp.ndarray) -> dict[str, jnp.ndarray]:
        """[G, D] -> the three named parts."""
        out, start = {}, 0
        for k, size in self.latent_sizes.items():
            out[k] = z[:, start : start + size]
            start += size
        return out

    def encode(self, graph) -> dict[str, jnp.ndarray]:
        """`autoperi_jax.nn.encoder.Encoder` on a padded batch."""
        return self.encoder(graph)

    def decode_lattice(self, z: jnp.ndarray) -> jnp.ndarray:
        """z [G, D] -> standardised lattice vector y [G, 6] (reads z_lattice only)."""
        return self.lattice_decoder(self.split_latent(z)["z_lattice"])

    def decode_composition(self, z: jnp.ndarray, n_atoms: jnp.ndarray):
        """z [G, D], n_atoms [G] -> count logits [G, A], species logits [G, A, 119]
        (``'slots'``) or element-fraction logits [G, 119] (``'fractions'``); reads z_comp
        only."""
        return self.composition_decoder(self.split_latent(z)["z_comp"], n_atoms)

    def velocity(self, z: jnp.ndarray, t: jnp.ndarray, inputs: VelocityInputs) -> jnp.ndarray:
        """Flow velocity [N, 3] (`VelocityField`), conditioned on all of z."""
        return self.velocity_field(z, t, inputs)

    def guess_coordinates(self, z: jnp.ndarray, numbers: jnp.ndarray) -> jnp.ndarray:
        """First guess of fractional coordinates [G, A, 3] of species-sorted slots."""
        return self.coordinate_guess(z, numbers)

    def connectivity(self, z, numbers_i, numbers_j, distances, edge_graph) -> jnp.ndarray:
        """Bond logits [E] of candidate edges (reads z_struct only)."""
        z_struct = self.split_latent(z)["z_struct"]
        return self.connectivity_decoder(z_struct, numbers_i, numbers_j, distances, edge_graph)

    def __call__(self, graph, t, velocity_inputs: VelocityInputs, connect_args):
        """Touches every part (used by ``init``)."""
        enc = self.encode(graph)
        z = enc["z"]
        y = self.decode_lattice(z)
        comp = self.decode_composition(z, jnp.zeros(z.shape[0], jnp.int32))
        v = self.velocity(z, t, velocity_inputs)
        c = self.connectivity(z, *connect_args)
        guess = self.guess_coordinates(z, jnp.zeros((z.shape[0], self.max_atoms), jnp.int32))
        return enc, y, comp, v, c, guess
