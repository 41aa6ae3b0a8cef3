"""Training for autoperi-jax: the train loop, sharding, checkpoints, configs."""
