"""Perov-5 autoencoder: ``autoperi train --config train/configs/perov_5.py --workdir RUN``.

Sized for a 2-core CPU: l <= 1 features (the l = 2 tensor products cost ~5x more on CPU
for no gain measured on Perov-5), a 6 A / 12-neighbour encoder graph and a 4 A in-jit
graph for the velocity field.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.progress = True

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "perov_5"
    c.data.properties = ("heat_ref",)
    c.data.cutoff = 6.0
    c.data.max_neighbors = 12
    c.data.num_buckets = 3
    c.data.atom_buckets = 1  # > 1: batch by atom count (`autoperi_jax.graph.atom_classes`)
    c.data.augment_rotate = False
    c.data.augment_shift = False
    c.data.data_dir = None
    c.data.cache_dir = None
    c.data.limit_train = None
    c.data.limit_val = None
    c.data.limit_test = None

    c.model = ml_collections.ConfigDict()
    c.model.max_atoms = 5
    c.model.image_embedding = "self_image"
    c.model.enc_layers = 3
    c.model.enc_irreps = "64x0e+16x1o"
    c.model.enc_cutoff = 6.0
    c.model.enc_avg_neighbors = 12.0
    c.model.dec_layers = 3
    c.model.dec_irreps = "64x0e+16x1o"
    c.model.dec_cutoff = 4.0
    c.model.dec_avg_neighbors = 16.0
    c.model.sh_lmax = 1
    c.model.num_basis = 8
    c.model.mlp_hidden = 64
    c.model.embed_features = 64
    c.model.head_hidden = 128
    c.model.latent_lattice = 8
    c.model.latent_comp = 32
    c.model.latent_struct = 32
    c.model.posterior = "deterministic"
    c.model.connect_cutoff = 4.0
    c.model.dec_global_context = False
    c.model.self_condition = False
    c.model.composition_head = "slots"  # or "fractions" (nn.decoder.CompositionDecoder)

    # ModelSettings (autoperi_jax.model); cutoffs and max_atoms come from c.model.
    c.objective = ml_collections.ConfigDict()
    c.objective.flow_max_shift = 2
    c.objective.flow_edges_per_crystal = 100
    c.objective.connect_max_shift = 2
    c.objective.connect_edges_per_crystal = 100
    c.objective.bond_tolerance = 0.25
    c.objective.num_steps = 20
    c.objective.lambda_lattice = 1.0
    c.objective.lambda_atom = 1.0
    c.objective.lambda_coord = 10.0
    c.objective.lambda_connect = 0.1
    c.objective.kl_weight = 1e-3
    c.objective.z_l2 = 0.0
    c.objective.z_noise = 0.0
    c.objective.time_power = 1.0
    c.objective.flow_target = "endpoint"
    c.objective.t_floor = 0.05
    c.objective.ot_max_atoms = 6
    c.objective.ot_translation = True
    c.objective.ot_rounds = 2
    c.objective.flow_prior = "learned"
    c.objective.prior_noise = 0.03
    c.objective.lambda_guess = 1.0
    c.objective.guess_stop_gradient = False
    # Total loss L_recon + beta_phys * L_phys (alpha * L_gen is the separate latent-flow
    # stage); L_phys acts on the decoder's one-shot structure (train.trainer.make_phys_fn).
    c.objective.beta_phys = 0.0

    c.physics = ml_collections.ConfigDict()
    c.physics.potential = "morse"  # "morse" / "lj" (UFF) or "soft_sphere"
    c.physics.cutoff = 6.0
    c.physics.chem_cutoff = 4.0
    c.physics.weights = (1.0, 1.0, 1.0)  # energy, phonon stability, chemistry; 0 = skip
    c.physics.mp_grid = (2, 2, 2)  # q-points: Gamma + this Monkhorst-Pack grid
    c.physics.en_weight = 1.0
    c.physics.stability_tolerance = 0.0
    c.physics.energy_reference = True  # L_energy relative to the true structure
    c.physics.chem_reference = True  # target coordination = the true structure's

    c.batch_size = 128  # global, over all devices and processes
    c.num_shards = 0  # shards of a global batch; 0 = one per device (see train.parallel)
    c.num_train_steps = 6000
    c.init_from = None  # a run's workdir or a model bundle / name: start from its parameters
    c.init_partial = False  # copy only the parameters whose path and shape still fit
    c.optimizer = "adamw"  # or "sgd"
    c.lr_scales = ()  # ((substring of a parameter path, factor), ...): per-module rates
    c.momentum = 0.0  # sgd only
    c.learning_rate = 2e-3
    c.final_lr_fraction = 0.01
    c.warmup_steps = 200
    c.weight_decay = 1e-5
    c.grad_clip = 1.0
    c.ema_decay = 0.0  # EMA of the parameters (0 = off); evaluation / saved params use it
    c.max_nonfinite_steps = 10  # stop after this many non-finite steps in a row

    c.log_every = 50
    c.tensorboard = True
    c.eval_every = 2000  # steps; -1 = every epoch; 0 = never
    c.eval_batches = 4
    c.eval_recon = 256
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3  # the last N, plus the best on val_loss
    c.async_checkpoint = True
    c.signal_sync_every = 10  # multi-process: steps between SIGTERM-flag exchanges
    return c
