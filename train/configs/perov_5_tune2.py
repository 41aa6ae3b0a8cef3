"""Perov-5 fine-tuning cycle 2 of the shipped autoencoder: cycle 1 (``runs/p5_d``,
`perov_5_tune1`) continued for 4,000 steps at a quarter of `perov_5`'s peak rate. The
order of the three commands is in `perov_5_tune1`.
"""

import ml_collections

from train.configs.perov_5 import get_config as perov_5_config


def get_config() -> ml_collections.ConfigDict:
    c = perov_5_config()
    c.init_from = "runs/p5_d"
    c.learning_rate = 5e-4
    c.num_train_steps = 4000
    return c
