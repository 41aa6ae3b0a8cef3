"""The next MP-20 autoencoder: ``autoperi train --config train/configs/mp_20_v2.py
--workdir RUN --config.data.data_dir=DIR``.

`train/configs/mp_20.py` (the shipped `mp_20` model's config) with the three changes that
docs/general.md ("A composition code that learns") measured:
- ``model.composition_head = "fractions"``: z_comp is a code of the composition alone and
  the decoder gives one distribution over elements, rounded to the atom count. The
  shipped model decodes the right composition for 3 % of validation crystals, and
  given the right atoms 37-41 % of its reconstructions match.
- ``lr_scales``: the composition path trains at 10x the GNNs' rate (3e-3 against 3e-4;
  the GNNs diverged at 5-6e-4 on MP-20, the composition path learned ten times slower
  at 3e-4).
- ``objective.guess_stop_gradient``: the coordinate guess's loss trains the guess, not
  the encoder.

Measured (2,500 steps of 64 from the shipped model's parameters, `init_from="mp_20"`,
``init_partial=True``: the new head and z_comp's input layer start fresh; 2-core CPU):
MP-20 test reconstruction 13.8 % (shipped model 1.5 %, the same direct check), but
sampled compositions blend elements (4.5 per sample; #elements EMD 1.52), so it is not
shipped; see docs/general.md. From scratch this config has not been run to the end (4,000 steps,
the shipped model's budget); the species decoder was still improving at 2,500 steps, so
an accelerator run should give it many more (``--config.num_train_steps``).
"""

import ml_collections

from train.configs.mp_20 import get_config as mp_20_config


def get_config() -> ml_collections.ConfigDict:
    c = mp_20_config()
    c.model.composition_head = "fractions"
    c.objective.guess_stop_gradient = True
    c.lr_scales = (("z_comp_", 10.0), ("composition_decoder", 10.0))
    return c
