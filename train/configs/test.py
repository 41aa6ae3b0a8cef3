"""Tiny config that trains end to end on CPU in seconds (used by the test suite)."""

import ml_collections

from train.configs.perov_5 import get_config as perov_5_config


def get_config() -> ml_collections.ConfigDict:
    c = perov_5_config()
    c.progress = False
    c.data.limit_train = 64
    c.data.limit_val = 16
    c.data.limit_test = 16
    c.data.num_buckets = 1
    c.model.enc_layers = 1
    c.model.enc_irreps = "16x0e+4x1o"
    c.model.dec_layers = 1
    c.model.dec_irreps = "16x0e+4x1o"
    c.model.mlp_hidden = 16
    c.model.embed_features = 16
    c.model.head_hidden = 32
    c.model.latent_lattice = 4
    c.model.latent_comp = 8
    c.model.latent_struct = 8
    c.objective.num_steps = 4
    c.batch_size = 16
    c.num_train_steps = 30
    c.learning_rate = 3e-3
    c.warmup_steps = 5
    c.log_every = 5
    c.eval_every = 40
    c.eval_batches = 1
    c.eval_recon = 0
    c.checkpoint_every = 20
    return c
