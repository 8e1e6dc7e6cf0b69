"""qrec's pure learning maths: JAX/Flax/optax and numpy only, no I/O (a layering test enforces it).

- `rl.batch`: ObsBatch / TransitionBatch and numpy builders from python lists.
- `rl.networks`: QNetwork, Q(s, a) = f(s) · e_a + b_a over a shared item table; dueling and SQN heads.
- `rl.value_learning`: per-transition TD errors (q_learning, double_q_learning) and huber_loss.
- `rl.train`: LearnerConfig, TrainState, update / update_many (target sync inside), reset_action_rows.
- `rl.replay`: numpy ring buffer, uniform or prioritized (sum tree).
- `rl.exploration`, `rl.slate`: schedules, and slates with exact per-position propensities.
- `rl.vocabulary`: raw item ids -> action indices with admission, eviction and index reuse.
- `rl.serialize`: pytrees to bytes, checksummed chunking.
- `rl.benchmark`: learner throughput, three designs side by side.

Submodules are imported explicitly (importing this package does not import JAX).
"""
