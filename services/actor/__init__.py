"""The actor: recommendations from the latest model, with exploration and exact propensities."""
