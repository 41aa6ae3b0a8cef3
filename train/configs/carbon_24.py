"""Carbon-24 autoencoder: ``autoperi train --config train/configs/carbon_24.py --workdir RUN
--config.data.data_dir=DIR`` (DIR/carbon_24/{train,val,test}.csv, CDVAE format; see
`autoperi_jax.datasets.DATASETS` for the download location).

Carbon-24 (Pickard 2020 AIRSS carbon, as split by CDVAE): 10,153 structures of 6-24 carbon
atoms, cells down to 2.4 A. Differences from `perov_5`: 24 atom slots, one species (the
composition head only learns the count), more in-jit edges per crystal (24 atoms with
~12-20 neighbours within 4 A), a wider decoder, smaller global batch. Not trained in this
repository yet: sizes are estimates, not tuned values.
"""

import ml_collections

from train.configs.perov_5 import get_config as perov_5_config


def get_config() -> ml_collections.ConfigDict:
    c = perov_5_config()
    c.data.dataset = "carbon_24"
    c.data.properties = ("energy_per_atom",)
    c.data.cutoff = 6.0
    c.data.max_neighbors = 16

    c.model.max_atoms = 24
    c.model.enc_layers = 4
    c.model.enc_irreps = "96x0e+24x1o"
    c.model.enc_avg_neighbors = 16.0
    c.model.dec_layers = 4
    c.model.dec_irreps = "96x0e+24x1o"
    c.model.dec_avg_neighbors = 16.0
    c.model.mlp_hidden = 96
    c.model.embed_features = 64
    c.model.head_hidden = 256
    c.model.latent_lattice = 8
    c.model.latent_comp = 16
    c.model.latent_struct = 96

    c.objective.flow_edges_per_crystal = 24 * 24
    c.objective.connect_edges_per_crystal = 24 * 24
    c.data.atom_buckets = 3  # 6-24 atoms
    c.objective.ot_max_atoms = 24  # exact same-species pairing (Hungarian, in jit)

    c.batch_size = 64
    c.num_train_steps = 40000
    c.learning_rate = 1e-3
    c.warmup_steps = 1000
    c.ema_decay = 0.999
    c.eval_every = 2000
    c.eval_recon = 256
    c.checkpoint_every = 2000
    return c
