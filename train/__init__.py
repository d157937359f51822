"""Training: TRL DPO recipes (train/recipes/) and accelerate configs (train/accelerate/)."""
