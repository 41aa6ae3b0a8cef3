"""MPTS-52 autoencoder: ``autoperi train --config train/configs/mpts_52.py --workdir RUN
--config.data.data_dir=DIR`` (DIR/mpts_52/{train,val,test}.csv, DiffCSP format).

MPTS-52 (Baird and Sparks; DiffCSP's split): Materials Project structures of 1-52 atoms,
split by time (train before 2018, val 2018-2019, test after). Differences from `mp_20`: 52
atom slots, four atom-count classes (most cells are small; the few 40-52-atom ones get
their own class), a smaller batch. The project has only part of the train split
(``mpts_52:train_partial``: 12,751 of 27,380 crystals, no property columns), hence no
property here. Not trained in this repository yet: sizes are estimates, not tuned values.
"""

import ml_collections

from train.configs.mp_20 import get_config as mp_20_config


def get_config() -> ml_collections.ConfigDict:
    c = mp_20_config()
    c.data.dataset = "mpts_52"
    c.data.properties = ()
    c.data.atom_buckets = 4

    c.model.max_atoms = 52
    c.objective.flow_edges_per_crystal = 52 * 16
    c.objective.connect_edges_per_crystal = 52 * 16
    c.objective.ot_max_atoms = 52

    c.batch_size = 32
    return c
