"""The shopper simulator: a seeded synthetic shop that closes the loop for the demo and evaluation.

Importing this package registers the Gymnasium environment ``qrec/Shopper-v0`` (when gymnasium is
installed), so ``gymnasium.make("qrec/Shopper-v0")`` works after ``import services.simulator``.
"""

from services.simulator.config import SimulatorConfig
from services.simulator.core import OPPORTUNITY_TYPES, REWARD_WEIGHTS, Catalogue, ShopperSimulator

ENV_ID = "qrec/Shopper-v0"

__all__ = [
    "ENV_ID",
    "OPPORTUNITY_TYPES",
    "REWARD_WEIGHTS",
    "Catalogue",
    "ShopperSimulator",
    "SimulatorConfig",
]


def _register_env() -> None:
    try:
        import gymnasium
    except ImportError:  # the simulator itself needs only numpy
        return
    if ENV_ID not in gymnasium.registry:
        gymnasium.register(id=ENV_ID, entry_point="services.simulator.env:ShopperEnv")


_register_env()
