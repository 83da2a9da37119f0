"""Training stages: ``train.loop.run(cfg)`` with the typed ``train.config.TrainConfig``."""
