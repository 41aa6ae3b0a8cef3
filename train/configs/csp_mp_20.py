"""Crystal structure prediction on an MP-20 autoencoder:
``autoperi train-flow --workdir RUN --config train/configs/csp_mp_20.py`` (or
``--pretrained mp_20``).

The CSP flow p(z | composition [, space group]) of `train/configs/csp_perov_5.py` on the
MP-20 flow stage's settings (`train/configs/flow_mp_20.py`). No sample check: the
check draws unconditioned samples, which this flow does not make.
"""

import importlib.util
from pathlib import Path

import ml_collections

_spec = importlib.util.spec_from_file_location(
    "_autoperi_flow_mp_20", Path(__file__).with_name("flow_mp_20.py")
)
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config() -> ml_collections.ConfigDict:
    c = _base.get_config()
    c.composition = True  # the context holds the atoms of the cell, never dropped
    c.properties = ()
    c.predict_properties = ()
    c.sample_check = 0
    c.select_on = "val_nll"
    c.num_steps = 10000
    c.val_every = 1000
    c.checkpoint_every = 1000
    c.sampler.conditioned_temperature = 1.0
    return c
