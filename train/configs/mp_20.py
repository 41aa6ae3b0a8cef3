"""MP-20 autoencoder: ``autoperi train --config train/configs/mp_20.py --workdir RUN
--config.data.data_dir=DIR`` (DIR/mp_20/{train,val,test}.csv, CDVAE or DiffCSP format;
without it the splits are downloaded once, see `autoperi_jax.datasets`).

MP-20 (CDVAE): 45,231 Materials Project structures with at most 20 atoms in the cell and
89 elements. Differences from `perov_5`: 20 atom slots, more in-jit edges per crystal, a
larger latent (composition and structure are far more varied), a wider network, smaller
global batch, more steps and an EMA of the parameters. Not trained in this repository
yet: sizes are estimates, not tuned values.
"""

import ml_collections

from train.configs.perov_5 import get_config as perov_5_config


def get_config() -> ml_collections.ConfigDict:
    c = perov_5_config()
    c.data.dataset = "mp_20"
    c.data.properties = ("formation_energy_per_atom",)
    c.data.cutoff = 6.0
    c.data.max_neighbors = 12
    c.data.atom_buckets = 3  # 1-20 atoms: small cells do not pay for 20 slots

    c.model.max_atoms = 20
    c.model.enc_layers = 4
    c.model.enc_irreps = "128x0e+32x1o"
    c.model.enc_avg_neighbors = 12.0
    c.model.dec_layers = 4
    c.model.dec_irreps = "128x0e+32x1o"
    c.model.dec_avg_neighbors = 12.0
    c.model.mlp_hidden = 128
    c.model.embed_features = 128
    c.model.head_hidden = 256
    c.model.latent_lattice = 8
    c.model.latent_comp = 64
    c.model.latent_struct = 64

    c.objective.flow_edges_per_crystal = 20 * 16
    c.objective.connect_edges_per_crystal = 20 * 16
    c.objective.ot_max_atoms = 20  # exact same-species pairing (Hungarian, in jit)

    c.batch_size = 64
    c.num_train_steps = 60000
    c.learning_rate = 1e-3
    c.warmup_steps = 1000
    c.ema_decay = 0.999
    c.eval_every = 2000
    c.eval_recon = 256
    c.checkpoint_every = 2000
    return c
