"""Deep-RL VM schedulers: SPANE and its baselines, trained by n-step double DQN on the batched simulator."""
