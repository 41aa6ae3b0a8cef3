"""Perov-5 fine-tuning cycle 1 of the shipped autoencoder: `perov_5` continued from its
6,000-step run (``runs/p5_c``) with a fresh warm-up + cosine cycle at half the peak rate.

    autoperi train --config train/configs/perov_5.py --workdir runs/p5_c
    autoperi train --config train/configs/perov_5_tune1.py --workdir runs/p5_d
    autoperi train --config train/configs/perov_5_tune2.py --workdir runs/p5_e

Validation reconstruction (first 1,000 crystals, deterministic decoding): RMSE 0.0189 after
runs/p5_c, 0.0157 after this cycle, 0.0147 after `perov_5_tune2` (`autoperi reconstruct
--workdir RUN --split val --limit 1000 --match`).
"""

import ml_collections

from train.configs.perov_5 import get_config as perov_5_config


def get_config() -> ml_collections.ConfigDict:
    c = perov_5_config()
    c.init_from = "runs/p5_c"
    c.learning_rate = 1e-3
    c.num_train_steps = 6000
    return c
