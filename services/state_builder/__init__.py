"""The state-builder process: per-user state and RL transitions from the clickstream and recommendations."""
