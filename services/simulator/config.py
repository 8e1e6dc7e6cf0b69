"""Settings of the shopper simulator: catalogue, population, behaviour and preference drift."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from services.config import ConfigError, setting


@dataclass(frozen=True, kw_only=True)
class SimulatorConfig:
    """A seeded synthetic shop: who browses, what they like, how they react to slates."""

    # Catalogue.
    num_items: int = setting(2000, help="items in the catalogue (ids sku-00000 ...)")
    num_categories: int = setting(20, help="item categories (ids cat-00 ...)")
    num_brands: int = setting(50, help="item brands (ids brand-00 ...)")
    taste_dim: int = setting(8, help="size of the latent taste vectors of shoppers and items")
    price_median: float = setting(30.0, help="median item price over the whole catalogue")
    category_price_spread: float = setting(
        0.7, help="standard deviation of the categories' mean log price around log(price_median)"
    )
    item_price_spread: float = setting(0.5, help="standard deviation of log price within a category")
    quality_scale: float = setting(0.5, help="standard deviation of an item's latent quality (liked by all)")

    # Population and sessions.
    num_users: int = setting(500, help="shoppers in the population (ids shopper-0000 ...)")
    start_time_ms: int = setting(
        1_717_200_000_000, help="simulated time the simulator starts at (ms since epoch; 2024-06-01 UTC)"
    )
    session_start_rate_per_minute: float = setting(
        30.0, help="sessions starting per simulated minute across the population (Poisson arrivals)"
    )
    mean_session_events: float = setting(
        8.0, help="mean number of actions of a session (geometric, at least 1) before clicks extend it"
    )
    think_time_seconds: float = setting(20.0, help="mean simulated gap between a shopper's actions")
    response_delay_seconds: float = setting(
        3.0, help="mean simulated gap between the steps of a reaction (slate shown, click, cart, purchase)"
    )
    organic_view_probability: float = setting(
        0.75, help="share of actions that are views of an item the shopper finds themselves"
    )
    rec_request_probability: float = setting(
        0.1, help="share of actions that ask for recommendations (rec_request); the rest go to checkout"
    )
    browse_temperature: float = setting(
        1.0, help="softmax temperature over true utilities when a shopper picks an item to view"
    )
    cart_abandon_probability: float = setting(
        0.3, help="at checkout, chance that a cart item the shopper does not buy is removed from the cart"
    )

    # Preferences.
    category_concentration: float = setting(
        0.3, help="Dirichlet concentration of a shopper's category preferences (small: few favourites)"
    )
    brand_concentration: float = setting(1.0, help="Dirichlet concentration of a shopper's brand preferences")
    category_weight: float = setting(1.0, help="weight of log category preference in the utility")
    brand_weight: float = setting(0.5, help="weight of log brand preference in the utility")
    taste_weight: float = setting(1.0, help="weight of taste . item features in the utility")
    price_sensitivity_min: float = setting(
        0.2, help="lowest shopper price sensitivity (utility per log price)"
    )
    price_sensitivity_max: float = setting(1.5, help="highest shopper price sensitivity (uniform in between)")
    session_intent_bonus: float = setting(
        1.0, help="utility added to items of the category a session is about (drawn at session start)"
    )
    preference_drift_per_day: float = setting(
        0.5, help="Ornstein-Uhlenbeck volatility of category logits, per sqrt(simulated day)"
    )
    preference_reversion_per_day: float = setting(
        0.05, help="rate at which drifting category logits pull back to the shopper's own base (per day)"
    )
    drift_step_seconds: float = setting(
        3600.0, help="preferences change in steps of this much simulated time"
    )

    # Reactions to a slate.
    slate_examine_probability: float = setting(
        1.0, help="chance a shopper examines the slate's first position"
    )
    position_bias_exponent: float = setting(
        0.8, help="examination of position p is slate_examine_probability / (1 + p) ** this"
    )
    no_click_utility: float = setting(
        5.0, help="utility of ignoring the slate (the outside option of the multinomial-logit choice)"
    )
    cart_probability_scale: float = setting(
        0.5, help="add_to_cart chance after a click or view is this times sigmoid(utility - no_click_utility)"
    )
    purchase_probability_scale: float = setting(
        0.6, help="purchase chance of a carted item is this times sigmoid(utility - price term - no_click)"
    )
    favorite_probability: float = setting(
        0.2, help="favorite chance after a click or view is this times sigmoid(utility - no_click_utility)"
    )
    click_session_extension: float = setting(
        1.0, help="mean number of extra actions a click adds to the session (Poisson)"
    )
    ignored_slate_exit_probability: float = setting(
        0.05, help="chance that a shopper who ignores a slate ends the session"
    )

    # Clickbait: the long-run lever a myopic policy cannot see.
    clickbait_share: float = setting(
        0.0,
        help="share of items that are clickbait: more appealing than they are worth, so a shopper who "
        "opens one from a recommendation may leave the shop (0: none)",
    )
    clickbait_appeal: float = setting(
        1.0, help="utility a clickbait item gains in every shopper's eyes (it is viewed and clicked more)"
    )
    clickbait_exit_probability: float = setting(
        0.3,
        help="chance that a shopper ends the session right after clicking a recommended clickbait item "
        "(the shop's own suggestion let them down; organic views of it do not end the session)",
    )

    seed: int = setting(0, help="seed of the catalogue, the shoppers, the drift and the behaviour")

    def __post_init__(self) -> None:
        for name in ("num_items", "num_categories", "num_brands", "num_users", "taste_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        positive = (
            "price_median",
            "mean_session_events",
            "think_time_seconds",
            "response_delay_seconds",
            "browse_temperature",
            "category_concentration",
            "brand_concentration",
            "drift_step_seconds",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        non_negative = (
            "category_price_spread",
            "item_price_spread",
            "clickbait_appeal",
            "quality_scale",
            "session_start_rate_per_minute",
            "price_sensitivity_min",
            "preference_drift_per_day",
            "preference_reversion_per_day",
            "position_bias_exponent",
            "click_session_extension",
            "start_time_ms",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        probabilities = (
            "organic_view_probability",
            "rec_request_probability",
            "cart_abandon_probability",
            "slate_examine_probability",
            "cart_probability_scale",
            "purchase_probability_scale",
            "favorite_probability",
            "ignored_slate_exit_probability",
            "clickbait_share",
            "clickbait_exit_probability",
        )
        for name in probabilities:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        if self.organic_view_probability + self.rec_request_probability > 1.0:
            raise ConfigError(
                "organic_view_probability + rec_request_probability must be at most 1, got "
                f"{self.organic_view_probability} + {self.rec_request_probability}"
            )
        if self.price_sensitivity_max < self.price_sensitivity_min:
            raise ConfigError(
                f"price_sensitivity_max ({self.price_sensitivity_max}) must be >= "
                f"price_sensitivity_min ({self.price_sensitivity_min})"
            )
        if self.mean_session_events < 1.0:
            raise ConfigError(f"mean_session_events must be at least 1, got {self.mean_session_events}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SimulatorConfig:
        """Build from a dict (e.g. a TOML table), rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown simulator setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**values)
