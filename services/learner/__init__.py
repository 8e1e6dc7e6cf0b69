"""The learner: DQN training from streamed transitions, publishing versioned models."""
