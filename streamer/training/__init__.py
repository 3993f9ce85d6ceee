"""Training and evaluating captioners: the synthetic world, `streamer train`, `streamer eval`."""
