"""Crystal structure prediction on a Perov-5 autoencoder:
``autoperi train-flow --pretrained perov_5 --workdir RUN --config train/configs/csp_perov_5.py``
(or ``--workdir RUN`` of your own autoencoder run).

A second latent flow p(z | composition [, space group]) on the same frozen encoder
(`train.flow_stage`, ``composition = True``); it is written to ``RUN/flow/model/csp``
and `autoperi_jax.api.Generator.predict_structures` / ``autoperi csp`` decode its z with
the given atoms (`autoperi_jax.sampling.make_sample_fn`). Everything not set here is the
generation flow's config (``flow_perov_5.py``).
"""

import importlib.util
from pathlib import Path

import ml_collections

_spec = importlib.util.spec_from_file_location(
    "_autoperi_flow_perov_5", Path(__file__).with_name("flow_perov_5.py")
)
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config() -> ml_collections.ConfigDict:
    c = _base.get_config()
    c.composition = True  # the context holds the atoms of the cell, never dropped
    c.properties = ()  # no property conditions (the space group stays, dropped 36 %)
    c.predict_properties = ()
    c.num_steps = 10000
    c.val_every = 1000
    c.checkpoint_every = 1000
    # Decoding of the predictions: the given atoms, the flow's z at this temperature,
    # 1 + retries candidates per composition of which the first that passes the contact
    # check is kept (the sampler settings below override the generation flow's).
    c.sampler.conditioned_temperature = 1.0
    return c
