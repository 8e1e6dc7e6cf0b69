"""A seeded synthetic shop: shoppers who browse, ask for slates, and click, cart and buy from them.

The simulator closes the recommendation loop without real users: ``advance`` produces the organic
clickstream up to a simulated time, ``respond`` gives a shopper's reaction to a Recommendation. It
is pure Python and numpy: no Kafka, no wall clock, no threads; the same calls in the same order give
the same events.

The true preference model
-------------------------
Items have a category, a brand, a price (lognormal around a per-category mean), a latent quality and
a latent feature vector. Shoppers have category preferences (Dirichlet), brand preferences
(Dirichlet), a price sensitivity and a latent taste vector. The utility of item i for shopper u is::

    taste_weight * taste_u . features_i + quality_i
    + category_weight * log(C * p_u(category_i)) + brand_weight * log(B * q_u(brand_i))
    - sensitivity_u * (log price_i - mean log price)
    + session_intent_bonus * [category_i == the session's intent category]

(log preferences relative to a uniform one, so an indifferent shopper scores 0 there). The choice
noise is the Gumbel noise of the multinomial logit. Category logits drift: every
``drift_step_seconds`` of simulated time each shopper's logits take an exact Ornstein-Uhlenbeck step
towards the shopper's own base logits, so what a shopper wants moves and a policy must keep learning.
The drift path is a function of the seed and the step index only: querying utilities never changes
it. Time only moves forward for preferences: a query for an earlier time sees the latest ones.

Sessions and actions
--------------------
Sessions start as a Poisson process (``session_start_rate_per_minute``) on a uniformly chosen shopper
without a session. A session is about one intent category (drawn from the shopper's current category
preferences) and lasts a geometric number of actions (mean ``mean_session_events``), an exponential
think time apart. The first action is a view. After a view, the next action first settles that item:
add_to_cart (chance ``cart_probability_scale * sigmoid(u - no_click_utility)``) or favorite (chance
``favorite_probability * sigmoid(...)``); otherwise the shopper views another item (chance
``organic_view_probability``; drawn by softmax of utility / ``browse_temperature``), asks for
recommendations (``rec_request_probability``), or goes to checkout when the cart is not empty (the
oldest cart item is bought with chance ``purchase_probability_scale * sigmoid(u - sensitivity *
log price - no_click_utility)``, else removed with chance ``cart_abandon_probability``, else looked
at again; with an empty cart it views instead; a purchase of an item carted from a slate carries
that slate's ``rec_id``, so a cart leads to a recommendation's reward later). A session ends one
think time after its last action, so a slate shown in reply to the last view can still keep the
shopper.

Reacting to a slate
-------------------
The shopper examines position p with probability ``slate_examine_probability / (1 + p) **
position_bias_exponent`` (unknown item ids and repeats take no part), then chooses among the examined
items and the no-click option by a softmax of utilities vs ``no_click_utility``. A click may be
followed by a favorite, an add_to_cart and then a purchase, each about ``response_delay_seconds``
later; all carry the recommendation's ``rec_id``. A click adds Poisson(``click_session_extension``)
actions to the session; an ignored slate ends it with chance ``ignored_slate_exit_probability``.
A share of the items (``clickbait_share``, none by default) is clickbait: in every shopper's eyes it
has ``clickbait_appeal`` more utility than it is worth, so it is viewed and clicked more, while the
favorite, cart and purchase chances follow its worth. A shopper who clicks a *recommended* clickbait
item is let down by the shop's suggestion and leaves (the session ends, the click's extension is
not drawn) with chance ``clickbait_exit_probability``. That cost comes after the reward, so a
myopic policy, the oracle included, cannot see it: it is the long-run lever of the shop.
Responses start after the shopper's last event, and the shopper's next action waits until after the
response, so each shopper's events are in time order; a response can however be later than events
of other shoppers that a later ``advance`` returns.
"""

from __future__ import annotations

import functools
import heapq
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from schemas.messages import ClickEvent, EventType, Recommendation
from services.simulator.config import SimulatorConfig

REWARD_WEIGHTS: Mapping[str, float] = MappingProxyType(
    {"click": 1.0, "add_to_cart": 3.0, "favorite": 2.0, "purchase": 10.0}
)
"""Reward of each feedback event on a recommended item (the state builder's default weights)."""

OPPORTUNITY_TYPES: frozenset[str] = frozenset({"view", "rec_request"})
"""Event types after which a recommender may show a slate."""

_MS_PER_DAY = 86_400_000.0
# Category preferences below this are floored so a log preference stays finite (about -7 in logits).
_MIN_PREFERENCE = 1e-3
_UNIFORM_BATCH = 4096
_DRIFT_STREAM = 2  # spawn key of the drift shocks, apart from the world and behaviour streams
_CLICKBAIT_STREAM = 3  # spawn key of the choice of clickbait items
# slate_value: exact over every examined subset up to this many items, over fixed draws beyond.
_EXACT_SLATE_ITEMS = 12
_SLATE_VALUE_DRAWS = 4096
_COUNTERS = ("recommendations", "shown", "clicks", "favorites", "carts", "purchases", "reward")


@functools.lru_cache(maxsize=256)
def _examined_subsets(chances: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Which positions a shopper examines, (subsets, k) bool, and each subset's probability,
    (subsets,), for positions examined independently with these chances: every subset for up to
    _EXACT_SLATE_ITEMS positions, else _SLATE_VALUE_DRAWS fixed draws of equal weight. Cached: a
    slate's chances are those of its positions, so a few tuples serve every slate of a run."""
    k = len(chances)
    chance = np.asarray(chances)  # (k,)
    if k <= _EXACT_SLATE_ITEMS:
        examined = ((np.arange(2**k)[:, None] >> np.arange(k)) & 1).astype(bool)  # (2^k, k) every subset
        p_examined = np.where(examined, chance, 1.0 - chance).prod(axis=1)  # (2^k,)
    else:
        draws = np.random.default_rng(0).random((_SLATE_VALUE_DRAWS, k))
        examined = draws < chance  # (draws, k)
        p_examined = np.full((_SLATE_VALUE_DRAWS,), 1.0 / _SLATE_VALUE_DRAWS)
    examined.flags.writeable = False  # shared by every later call with these chances
    p_examined.flags.writeable = False
    return examined, p_examined


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


@dataclass(frozen=True)
class Catalogue:
    """The items on sale: ids plus index-aligned attribute arrays (index i is ``item_ids[i]``)."""

    item_ids: tuple[str, ...]
    category_ids: tuple[str, ...]
    brand_ids: tuple[str, ...]
    category: np.ndarray  # (num_items,) int, index into category_ids
    brand: np.ndarray  # (num_items,) int, index into brand_ids
    price: np.ndarray  # (num_items,) float, rounded to cents
    quality: np.ndarray  # (num_items,) float
    features: np.ndarray  # (num_items, taste_dim) float
    log_price_relative: np.ndarray  # (num_items,) log(price) - mean log(price)
    clickbait: np.ndarray  # (num_items,) bool


def make_catalogue(config: SimulatorConfig, rng: np.random.Generator) -> Catalogue:
    """Items with categories, brands, lognormal prices by category, quality and latent features."""
    n, c, b = config.num_items, config.num_categories, config.num_brands
    category = rng.integers(c, size=n)  # (num_items,)
    brand = rng.integers(b, size=n)  # (num_items,)
    category_log_price = math.log(config.price_median) + config.category_price_spread * rng.standard_normal(c)
    log_price = category_log_price[category] + config.item_price_spread * rng.standard_normal(n)
    price = np.maximum(np.round(np.exp(log_price), 2), 0.01)  # (num_items,)
    quality = config.quality_scale * rng.standard_normal(n)  # (num_items,)
    # Scaled so taste . features is about unit variance for unit-normal tastes.
    features = rng.standard_normal((n, config.taste_dim)) / math.sqrt(config.taste_dim)
    log_p = np.log(price)
    # From a stream of its own, so the clickbait settings leave every other draw as it was.
    clickbait_rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(_CLICKBAIT_STREAM,)))
    clickbait = np.zeros((n,), bool)  # (num_items,)
    clickbait[clickbait_rng.permutation(n)[: round(config.clickbait_share * n)]] = True
    return Catalogue(
        item_ids=tuple(f"sku-{i:0{max(5, len(str(n - 1)))}d}" for i in range(n)),
        category_ids=tuple(f"cat-{i:0{max(2, len(str(c - 1)))}d}" for i in range(c)),
        brand_ids=tuple(f"brand-{i:0{max(2, len(str(b - 1)))}d}" for i in range(b)),
        category=category,
        brand=brand,
        price=price,
        quality=quality,
        features=features,
        log_price_relative=log_p - log_p.mean(),
        clickbait=clickbait,
    )


@dataclass(slots=True)
class _Session:
    """One shopper's visit, as the simulator drives it."""

    session_id: str
    user: int
    intent: int  # category index the session is about
    remaining_actions: int
    next_action_ms: int
    manual: bool  # started by start_session: stepped by step_session, never by advance
    version: int = 0  # bumped when next_action_ms moves, so stale heap entries are skipped
    last_event_ms: int = 0
    actions: int = 0
    on_screen: int = -1  # item index of the last view or click, -1 before any
    on_screen_open: bool = False  # an organic view whose cart/favorite decision is still to come
    cart: list[int] = field(default_factory=list)
    cart_rec_ids: dict[int, str] = field(default_factory=dict)  # cart item -> the rec it was carted from
    utilities: np.ndarray | None = None  # (num_items,) at utilities_step
    browse_cdf: np.ndarray | None = None  # (num_items,) cumulative browse weights at utilities_step
    utilities_step: int = -1


class ShopperSimulator:
    """A population of simulated shoppers over a synthetic catalogue, stepped in simulated time."""

    def __init__(self, config: SimulatorConfig | None = None, *, rng: np.random.Generator | None = None):
        """Build the shop from ``config.seed``; ``rng`` replaces only the behaviour randomness.

        The catalogue, the shoppers and their preference drift always come from ``config.seed``;
        arrivals and choices come from ``rng`` when given (a Gymnasium env passes its np_random),
        else from ``config.seed`` too.
        """
        self.config = config = config if config is not None else SimulatorConfig()
        world_seed, behaviour_seed = np.random.SeedSequence(config.seed).spawn(2)
        world = np.random.default_rng(world_seed)
        self._rng = rng if rng is not None else np.random.default_rng(behaviour_seed)
        # Uniform draws are taken from a buffer: one numpy call per draw would dominate the run time.
        self._uniforms: list[float] = []

        self.catalogue = catalogue = make_catalogue(config, world)
        u, c, b = config.num_users, config.num_categories, config.num_brands
        self.user_ids: tuple[str, ...] = tuple(f"shopper-{i:0{max(4, len(str(u - 1)))}d}" for i in range(u))
        self._user_index = {user_id: i for i, user_id in enumerate(self.user_ids)}
        self._item_index = {item_id: i for i, item_id in enumerate(catalogue.item_ids)}
        self._taste = config.taste_weight * world.standard_normal((u, config.taste_dim))  # (users, taste_dim)
        category_preference = world.dirichlet(np.full(c, config.category_concentration), size=u)  # (users, C)
        self._base_logits = np.log(np.maximum(category_preference, _MIN_PREFERENCE))  # (users, C)
        self._logits = self._base_logits.copy()  # (users, C), drifts
        brand_preference = world.dirichlet(np.full(b, config.brand_concentration), size=u)  # (users, B)
        # (users, B): log(B * q), relative to an indifferent shopper.
        self._brand_log_preference = np.log(np.maximum(brand_preference, _MIN_PREFERENCE)) + math.log(b)
        self._sensitivity = world.uniform(config.price_sensitivity_min, config.price_sensitivity_max, size=u)
        # Per-item attributes as Python lists: events read them one at a time.
        self._item_category = [catalogue.category_ids[k] for k in catalogue.category]
        self._item_brand = [catalogue.brand_ids[k] for k in catalogue.brand]
        self._item_price = [float(p) for p in catalogue.price]
        self._clickbait: list[bool] = catalogue.clickbait.tolist()
        # (num_items,) what clickbait adds to an item's pull on the eye (views, clicks), not to its worth.
        self._appeal = config.clickbait_appeal * catalogue.clickbait
        self._appeal_list: list[float] = self._appeal.tolist()
        self._items_by_category = [np.flatnonzero(catalogue.category == k) for k in range(c)]
        self._examine = self._examine_probabilities(64)
        self._examine_list: list[float] = self._examine.tolist()

        self._drift_step_ms = max(1, round(config.drift_step_seconds * 1000))
        self._drift_index = 0  # the drift step behaviour has reached; self._logits are at it
        self._lookahead: tuple[int, np.ndarray] | None = None  # a later step computed for a query
        self.now_ms = config.start_time_ms
        """Simulated time the organic activity has been produced up to."""
        self._next_arrival_ms = self._arrival_after(config.start_time_ms)
        self._sessions: dict[int, _Session] = {}
        self._idle = list(range(u))  # users without a session; swap-removed
        self._idle_position = list(range(u))
        self._heap: list[tuple[int, int, int, int]] = []  # (time_ms, sequence, user, session version)
        self._sequence = 0
        self._event_counter = 0
        self._session_counter = 0
        self._request_counter = 0
        self._stats: dict[str, dict[str, float]] = {}
        self.shown_total = 0
        """Slates ``respond`` showed to a shopper in session, over all policies (never reset)."""

    # ----------------------------------------------------------------------------------- lookups

    @property
    def item_ids(self) -> tuple[str, ...]:
        return self.catalogue.item_ids

    def item_index(self, item_id: str) -> int | None:
        """The catalogue index of an item id, or None for an unknown id."""
        return self._item_index.get(item_id)

    def active_session_id(self, user_id: str) -> str | None:
        """The id of the shopper's session in progress, or None."""
        user = self._user_index.get(user_id)
        session = self._sessions.get(user) if user is not None else None
        return session.session_id if session is not None else None

    # ------------------------------------------------------------------------- preference model

    def true_utilities(self, user_id: str, now_ms: int) -> np.ndarray:
        """The shopper's expected utility of every item at ``now_ms``; (num_items,).

        Includes the intent bonus of the session in progress. Asking never changes what the
        shoppers do later; a time before the simulator's latest one sees the latest preferences.
        """
        user = self._user(user_id)
        step = self._drift_step_of(now_ms)
        session = self._sessions.get(user)
        if step <= self._drift_index:
            if session is not None:
                return self._session_utilities(session).copy()
            return self._base_utilities(user, self._logits[user])
        utilities = self._base_utilities(user, self._logits_ahead(step)[user])
        if session is not None:
            utilities[self._items_by_category[session.intent]] += self.config.session_intent_bonus
        return utilities

    def expected_click_rewards(self, user_id: str, now_ms: int) -> np.ndarray:
        """Expected reward of showing each item alone at the top of a slate; (num_items,).

        P(click) * E[reward | click] with P(click) = sigmoid(utility + clickbait appeal -
        no_click_utility) times the top position's examination chance, and the reward of the click,
        favorite, cart and purchase that may follow it (REWARD_WEIGHTS), which follow the worth
        (utility) alone. What a click on clickbait costs later is not in it: this is myopic.
        """
        cfg = self.config
        utilities = self.true_utilities(user_id, now_ms)  # (num_items,)
        margin = utilities - cfg.no_click_utility
        p_click = 1.0 / (1.0 + np.exp(-(margin + self._appeal)))  # (num_items,) clickbait is clicked more
        return cfg.slate_examine_probability * p_click * self._reward_of_click(self._user(user_id), utilities)

    def _reward_of_click(self, user: int, utilities: np.ndarray) -> np.ndarray:
        """Expected reward of a click on each item: the click, and the favorite, cart and purchase
        that may follow it, which follow the item's worth (utility) alone; (num_items,)."""
        cfg = self.config
        margin = utilities - cfg.no_click_utility
        liking = 1.0 / (1.0 + np.exp(-margin))  # (num_items,)
        buy_margin = margin - self._sensitivity[user] * self.catalogue.log_price_relative
        p_buy = cfg.purchase_probability_scale / (1.0 + np.exp(-buy_margin))  # (num_items,)
        w = REWARD_WEIGHTS
        return (
            w["click"]
            + w["favorite"] * cfg.favorite_probability * liking
            + cfg.cart_probability_scale * liking * (w["add_to_cart"] + w["purchase"] * p_buy)
        )

    def oracle_slate(self, user_id: str, k: int, now_ms: int, exclude: Iterable[str] = ()) -> list[str]:
        """The myopic oracle: the k items of highest expected immediate reward, best first.

        Ranks by ``expected_click_rewards`` (true utilities, no position or slate interactions), so
        the best item gets the most examined position; ``exclude`` holds item ids never to show.
        """
        if not 1 <= k <= self.config.num_items:
            raise ValueError(f"k must be between 1 and num_items ({self.config.num_items}), got {k}")
        value = self.expected_click_rewards(user_id, now_ms)  # (num_items,)
        for item_id in exclude:
            index = self._item_index.get(item_id)
            if index is not None:
                value[index] = -np.inf
        top = np.argpartition(-value, k - 1)[:k]
        ranked = top[np.argsort(-value[top], kind="stable")]
        return [self.catalogue.item_ids[i] for i in ranked.tolist()]

    def slate_value(self, user_id: str, item_ids: Iterable[str], now_ms: int) -> float:
        """Expected immediate reward of showing this slate now, by the simulator's own reaction model.

        Each position p is examined with its chance, independently; the shopper picks among the
        examined items and the no-click option by the multinomial logit of ``respond``; the click is
        worth what ``expected_click_rewards`` counts after it (click, favorite, cart, purchase). The
        expectation over which positions are examined is exact for up to 12 distinct known items,
        and over 4,096 fixed draws beyond. Unknown ids and repeats count nothing but keep their
        position, as in ``respond``. What a click changes later (a longer session, a clickbait exit)
        is not in it. It draws nothing: asking never changes what the shoppers do.
        """
        cfg = self.config
        user = self._user(user_id)
        utilities = self.true_utilities(user_id, now_ms)  # (num_items,)
        ids = list(item_ids)
        examine = (
            self._examine_list
            if len(ids) <= len(self._examine_list)
            else self._examine_probabilities(len(ids)).tolist()
        )
        items: list[int] = []
        chances: list[float] = []
        for position, item_id in enumerate(ids):
            item = self._item_index.get(item_id)
            if item is None or item in items:
                continue
            items.append(item)
            chances.append(examine[position])
        if not items:
            return 0.0
        index = np.asarray(items)
        reward = self._reward_of_click(user, utilities)[index]  # (k,)
        # Choice weights relative to the outside option: P(i | examined S) = w_i / (1 + sum_S w).
        weight = np.exp(utilities[index] + self._appeal[index] - cfg.no_click_utility)  # (k,)
        examined, p_examined = _examined_subsets(tuple(chances))
        chosen = examined * weight  # (subsets, k)
        click = chosen / (1.0 + chosen.sum(axis=1, keepdims=True))  # (subsets, k)
        return float(p_examined @ (click @ reward))

    def _examine_probabilities(self, k: int) -> np.ndarray:
        positions = np.arange(k, dtype=np.float64)  # (k,)
        return self.config.slate_examine_probability / (1.0 + positions) ** self.config.position_bias_exponent

    def _base_utilities(self, user: int, logits: np.ndarray) -> np.ndarray:
        """Utilities without session intent, given the shopper's category logits (C,); (num_items,)."""
        cfg, cat = self.config, self.catalogue
        shifted = logits - logits.max()
        log_preference = shifted - math.log(float(np.exp(shifted).sum())) + math.log(cfg.num_categories)
        utilities = cat.features @ self._taste[user]  # (num_items,)
        utilities += cat.quality
        utilities += cfg.category_weight * log_preference[cat.category]
        utilities += cfg.brand_weight * self._brand_log_preference[user][cat.brand]
        utilities -= self._sensitivity[user] * cat.log_price_relative
        return utilities

    def _session_utilities(self, session: _Session) -> np.ndarray:
        if session.utilities is None or session.utilities_step != self._drift_index:
            utilities = self._base_utilities(session.user, self._logits[session.user])
            utilities[self._items_by_category[session.intent]] += self.config.session_intent_bonus
            appealing = utilities + self._appeal  # clickbait draws the eye beyond its worth
            browse = np.exp((appealing - appealing.max()) / self.config.browse_temperature)
            session.utilities = utilities
            session.browse_cdf = np.cumsum(browse)
            session.utilities_step = self._drift_index
        return session.utilities

    def _drift_step_of(self, now_ms: int) -> int:
        return max(0, (now_ms - self.config.start_time_ms) // self._drift_step_ms)

    def _drift_from(self, logits: np.ndarray, step: int) -> np.ndarray:
        """Category logits (users, C) after drift step ``step`` (an exact Ornstein-Uhlenbeck step).

        The shocks of each step come from their own seed (config.seed, step), so the path is the
        same whoever computes it and whenever.
        """
        cfg = self.config
        dt_days = self._drift_step_ms / _MS_PER_DAY
        theta, sigma = cfg.preference_reversion_per_day, cfg.preference_drift_per_day
        if theta > 0:
            keep = math.exp(-theta * dt_days)
            noise = sigma * math.sqrt((1.0 - keep * keep) / (2.0 * theta))
        else:
            keep, noise = 1.0, sigma * math.sqrt(dt_days)
        seed = np.random.SeedSequence(cfg.seed, spawn_key=(_DRIFT_STREAM, step))
        shocks = np.random.default_rng(seed).standard_normal(logits.shape)  # (users, C)
        return self._base_logits + keep * (logits - self._base_logits) + noise * shocks

    def _sync_drift(self, now_ms: int) -> None:
        """Move the shoppers' preferences (what behaviour uses) forward to the step of now_ms."""
        target = self._drift_step_of(now_ms)
        if target <= self._drift_index:
            return
        if self._lookahead is not None and self._drift_index < self._lookahead[0] <= target:
            self._drift_index, self._logits = self._lookahead
        while self._drift_index < target:
            self._drift_index += 1
            self._logits = self._drift_from(self._logits, self._drift_index)

    def _logits_ahead(self, step: int) -> np.ndarray:
        """Category logits at a later step than behaviour has reached, without moving behaviour."""
        index, logits = self._drift_index, self._logits
        if self._lookahead is not None and index < self._lookahead[0] <= step:
            index, logits = self._lookahead
        while index < step:
            index += 1
            logits = self._drift_from(logits, index)
        self._lookahead = (index, logits)
        return logits

    # ------------------------------------------------------------------------- organic activity

    def advance(self, now_ms: int) -> list[ClickEvent]:
        """The organic events of all shoppers from the last call up to simulated time ``now_ms``.

        Timestamps are non-decreasing along the returned list. Calling with a time at or before
        the previous one returns nothing.
        """
        events: list[ClickEvent] = []
        heap = self._heap
        while True:
            next_action = heap[0][0] if heap else math.inf
            if self._next_arrival_ms <= now_ms and self._next_arrival_ms <= next_action:
                arrival = int(self._next_arrival_ms)
                self._next_arrival_ms = self._arrival_after(arrival)
                if self._idle:
                    user = self._idle[min(int(self._uniform() * len(self._idle)), len(self._idle) - 1)]
                    self._begin(user, arrival, manual=False)
                continue
            if next_action > now_ms:
                break
            time_ms, _, user, version = heapq.heappop(heap)
            session = self._sessions.get(user)
            if session is None or session.version != version:
                continue  # the session ended or its next action was moved by a response
            events.extend(self._act(session, time_ms))
        self.now_ms = max(self.now_ms, now_ms)
        return events

    def start_session(self, user_id: str, now_ms: int) -> str:
        """Start a session for an idle shopper at now_ms, driven only by ``step_session``.

        For episode-by-episode use (the Gymnasium env, offline evaluation); ``advance`` leaves
        such sessions alone. Returns the session id.
        """
        user = self._user(user_id)
        if user in self._sessions:
            raise ValueError(f"{user_id} already has a session in progress")
        return self._begin(user, now_ms, manual=True).session_id

    def step_session(self, user_id: str) -> list[ClickEvent]:
        """Run the shopper's next action of a ``start_session`` session; [] once the session is over."""
        session = self._sessions.get(self._user(user_id))
        if session is None:
            return []
        if not session.manual:
            raise ValueError(f"{user_id}'s session is driven by advance(), not step_session()")
        return self._act(session, session.next_action_ms)

    def end_session(self, user_id: str) -> None:
        """End the shopper's session now (no event), if there is one."""
        session = self._sessions.get(self._user(user_id))
        if session is not None:
            self._end(session)

    def _user(self, user_id: str) -> int:
        user = self._user_index.get(user_id)
        if user is None:
            raise KeyError(f"unknown shopper {user_id!r}")
        return user

    def _arrival_after(self, time_ms: float) -> float:
        rate = self.config.session_start_rate_per_minute
        if rate <= 0:
            return math.inf
        return time_ms + 1 + int(-60_000.0 / rate * math.log(1.0 - self._uniform()))

    def _uniform(self) -> float:
        """A uniform draw in [0, 1) from the behaviour generator."""
        if not self._uniforms:
            self._uniforms = self._rng.random(_UNIFORM_BATCH).tolist()[::-1]
        return self._uniforms.pop()

    def _gap_ms(self, mean_seconds: float) -> int:
        """An exponential gap of at least 1 ms, so each shopper's events have distinct times."""
        return 1 + int(-mean_seconds * 1000.0 * math.log(1.0 - self._uniform()))

    def _geometric(self, p: float) -> int:
        """A geometric count >= 1 with success chance p (mean 1 / p), by inversion."""
        if p >= 1.0:
            return 1
        return 1 + int(math.log(1.0 - self._uniform()) / math.log(1.0 - p))

    def _poisson(self, mean: float) -> int:
        """A Poisson count by multiplying uniforms (Knuth); meant for small means."""
        limit, count, product = math.exp(-mean), 0, self._uniform()
        while product >= limit:
            count += 1
            product *= self._uniform()
        return count

    def _sample_index(self, cdf: np.ndarray) -> int:
        """An index drawn with probability proportional to the increments of an increasing cdf."""
        index = int(cdf.searchsorted(self._uniform() * float(cdf[-1]), side="right"))
        return min(index, len(cdf) - 1)

    def _begin(self, user: int, time_ms: int, *, manual: bool) -> _Session:
        self._sync_drift(time_ms)
        logits = self._logits[user]
        intent = self._sample_index(np.cumsum(np.exp(logits - logits.max())))
        self._session_counter += 1
        session = _Session(
            session_id=f"session-{self._session_counter}",
            user=user,
            intent=intent,
            remaining_actions=self._geometric(1.0 / self.config.mean_session_events),
            next_action_ms=time_ms,
            manual=manual,
            last_event_ms=time_ms,
        )
        self._sessions[user] = session
        # Swap-remove the user from the idle list.
        position, last = self._idle_position[user], self._idle[-1]
        self._idle[position], self._idle_position[last] = last, position
        self._idle.pop()
        self._schedule(session, time_ms)
        return session

    def _end(self, session: _Session) -> None:
        del self._sessions[session.user]
        self._idle_position[session.user] = len(self._idle)
        self._idle.append(session.user)

    def _schedule(self, session: _Session, time_ms: int) -> None:
        session.version += 1
        session.next_action_ms = time_ms
        if not session.manual:
            self._sequence += 1
            heapq.heappush(self._heap, (time_ms, self._sequence, session.user, session.version))

    def _event(
        self,
        session: _Session,
        event_type: EventType,
        time_ms: int,
        item: int = -1,
        *,
        rec_id: str | None = None,
        request_id: str | None = None,
    ) -> ClickEvent:
        self._event_counter += 1
        session.last_event_ms = time_ms
        if item < 0:
            return ClickEvent(
                event_id=f"sim-{self._event_counter}",
                user_id=self.user_ids[session.user],
                session_id=session.session_id,
                event_type=event_type,
                timestamp=time_ms,
                request_id=request_id,
            )
        return ClickEvent(
            event_id=f"sim-{self._event_counter}",
            user_id=self.user_ids[session.user],
            session_id=session.session_id,
            event_type=event_type,
            timestamp=time_ms,
            item_id=self.catalogue.item_ids[item],
            rec_id=rec_id,
            request_id=request_id,
            category=self._item_category[item],
            brand=self._item_brand[item],
            price=self._item_price[item],
        )

    def _act(self, session: _Session, time_ms: int) -> list[ClickEvent]:
        """One action of a shopper at time_ms: exactly one event, or [] when the session is over."""
        self._sync_drift(time_ms)
        if session.remaining_actions <= 0:
            self._end(session)
            return []
        cfg = self.config
        session.remaining_actions -= 1
        session.actions += 1
        utilities = self._session_utilities(session)
        event: ClickEvent | None = None
        if session.on_screen_open:
            # First settle the item the shopper was looking at.
            session.on_screen_open = False
            item = session.on_screen
            liking = _sigmoid(float(utilities[item]) - cfg.no_click_utility)
            p_cart = cfg.cart_probability_scale * liking
            draw = self._uniform()
            if draw < p_cart and item not in session.cart:
                session.cart.append(item)
                event = self._event(session, "add_to_cart", time_ms, item)
            elif draw < p_cart + cfg.favorite_probability * liking:
                event = self._event(session, "favorite", time_ms, item)
        if event is None:
            draw = self._uniform()
            if session.actions == 1 or draw < cfg.organic_view_probability:
                event = self._view(session, time_ms)
            elif draw < cfg.organic_view_probability + cfg.rec_request_probability:
                self._request_counter += 1
                event = self._event(
                    session,
                    "rec_request",
                    time_ms,
                    session.on_screen,
                    request_id=f"req-{self._request_counter}",
                )
            elif session.cart:
                event = self._checkout(session, time_ms, utilities)
            else:
                event = self._view(session, time_ms)
        self._schedule(session, time_ms + self._gap_ms(cfg.think_time_seconds))
        return [event]

    def _view(self, session: _Session, time_ms: int) -> ClickEvent:
        cdf = session.browse_cdf
        assert cdf is not None
        item = self._sample_index(cdf)
        session.on_screen, session.on_screen_open = item, True
        return self._event(session, "view", time_ms, item)

    def _maybe_let_down(self, session: _Session, item: int) -> bool:
        """A shopper who clicked a recommended clickbait item leaves, with chance clickbait_exit_probability.

        The shop's own suggestion let them down. The session ends one think time later, unless a
        slate shown before then wins them back. Draws nothing for other items, so without clickbait
        the behaviour is as before.
        """
        if self._clickbait[item] and self._uniform() < self.config.clickbait_exit_probability:
            session.remaining_actions = 0
            return True
        return False

    def _checkout(self, session: _Session, time_ms: int, utilities: np.ndarray) -> ClickEvent:
        cfg = self.config
        item = session.cart[0]
        p_buy = cfg.purchase_probability_scale * _sigmoid(
            float(utilities[item])
            - cfg.no_click_utility
            - self._sensitivity[session.user] * self.catalogue.log_price_relative[item]
        )
        draw = self._uniform()
        if draw < p_buy:
            session.cart.pop(0)
            # A purchase of an item carted from a slate is that recommendation's late reward.
            rec_id = session.cart_rec_ids.pop(item, None)
            return self._event(session, "purchase", time_ms, item, rec_id=rec_id)
        if draw < p_buy + (1.0 - p_buy) * cfg.cart_abandon_probability:
            session.cart.pop(0)
            session.cart_rec_ids.pop(item, None)
            return self._event(session, "remove_from_cart", time_ms, item)
        session.on_screen, session.on_screen_open = item, False
        return self._event(session, "view", time_ms, item)

    # ------------------------------------------------------------------------- slate responses

    def respond(self, rec: Recommendation, now_ms: int) -> list[ClickEvent]:
        """The shopper's reaction to a slate shown at now_ms: [] or a click and what follows it.

        No reaction for an unknown user, a shopper without a session in progress, or a
        recommendation made for another session (``rec.session_id`` set and different).
        """
        stats = self._policy_stats(rec.policy)
        stats["recommendations"] += 1
        user = self._user_index.get(rec.user_id)
        session = self._sessions.get(user) if user is not None else None
        if session is None or (rec.session_id is not None and rec.session_id != session.session_id):
            return []
        if session.remaining_actions <= 0 and session.next_action_ms <= now_ms:
            self._end(session)  # the shopper had already left by now
            return []
        cfg = self.config
        self._sync_drift(now_ms)
        stats["shown"] += 1
        self.shown_total += 1
        utilities = self._session_utilities(session)

        # Position-biased examination, then a multinomial logit over the examined items and the
        # outside option. Small slates: plain Python beats numpy's per-call overhead here.
        examine = self._examine_list
        if len(rec.items) > len(examine):
            examine = self._examine_probabilities(len(rec.items)).tolist()
        seen: set[int] = set()
        candidates: list[int] = []
        for position, slot in enumerate(rec.items):
            item = self._item_index.get(slot.item_id)
            if item is None or item in seen:
                continue
            seen.add(item)
            if self._uniform() < examine[position]:
                candidates.append(item)
        choice = -1
        if candidates:
            appeal = self._appeal_list
            values = [float(utilities[item]) + appeal[item] for item in candidates]
            top = max(cfg.no_click_utility, *values)
            weights = [math.exp(v - top) for v in values]
            draw = self._uniform() * (math.exp(cfg.no_click_utility - top) + sum(weights))
            cumulative = math.exp(cfg.no_click_utility - top)
            for item, weight in zip(candidates, weights, strict=True):
                if draw < cumulative:
                    break
                cumulative += weight
                choice = item
        if choice < 0:
            if self._uniform() < cfg.ignored_slate_exit_probability:
                session.remaining_actions = 0
            return []

        margin = float(utilities[choice]) - cfg.no_click_utility
        liking = _sigmoid(margin)
        p_buy = cfg.purchase_probability_scale * _sigmoid(
            margin - self._sensitivity[session.user] * self.catalogue.log_price_relative[choice]
        )
        favorite_draw, cart_draw, buy_draw = self._uniform(), self._uniform(), self._uniform()
        time_ms = max(now_ms, session.last_event_ms) + self._gap_ms(cfg.response_delay_seconds)
        events = [self._event(session, "click", time_ms, choice, rec_id=rec.rec_id)]
        stats["clicks"] += 1
        reward = REWARD_WEIGHTS["click"]
        if favorite_draw < cfg.favorite_probability * liking:
            time_ms += self._gap_ms(cfg.response_delay_seconds)
            events.append(self._event(session, "favorite", time_ms, choice, rec_id=rec.rec_id))
            stats["favorites"] += 1
            reward += REWARD_WEIGHTS["favorite"]
        if choice not in session.cart and cart_draw < cfg.cart_probability_scale * liking:
            time_ms += self._gap_ms(cfg.response_delay_seconds)
            events.append(self._event(session, "add_to_cart", time_ms, choice, rec_id=rec.rec_id))
            stats["carts"] += 1
            reward += REWARD_WEIGHTS["add_to_cart"]
            if buy_draw < p_buy:
                time_ms += self._gap_ms(cfg.response_delay_seconds)
                events.append(self._event(session, "purchase", time_ms, choice, rec_id=rec.rec_id))
                stats["purchases"] += 1
                reward += REWARD_WEIGHTS["purchase"]
            else:
                session.cart.append(choice)
                session.cart_rec_ids[choice] = rec.rec_id
        stats["reward"] += reward
        session.on_screen, session.on_screen_open = choice, False
        if not self._maybe_let_down(session, choice):
            session.remaining_actions += self._poisson(cfg.click_session_extension)
        next_action_ms = time_ms + self._gap_ms(cfg.think_time_seconds)
        # Never before what advance() already returned, so its output stays in time order.
        self._schedule(session, next_action_ms if session.manual else max(next_action_ms, self.now_ms))
        return events

    # ----------------------------------------------------------------------------- evaluation

    def _policy_stats(self, policy: str) -> dict[str, float]:
        stats = self._stats.get(policy)
        if stats is None:
            stats = self._stats[policy] = dict.fromkeys(_COUNTERS, 0.0)
        return stats

    def stats(self) -> dict[str, dict[str, float]]:
        """Per policy (``rec.policy``): counts, reward and rates of the responses so far.

        Keys: recommendations (all respond calls), shown (to a shopper in session), clicks,
        favorites, carts, purchases, reward (click 1, add_to_cart 3, favorite 2, purchase 10),
        ctr (clicks / shown), reward_per_recommendation (reward / recommendations) and
        reward_per_shown (reward / shown).
        """
        report: dict[str, dict[str, float]] = {}
        for policy, counters in sorted(self._stats.items()):
            shown = counters["shown"]
            report[policy] = {
                **counters,
                "ctr": counters["clicks"] / shown if shown else 0.0,
                "reward_per_recommendation": (
                    counters["reward"] / counters["recommendations"] if counters["recommendations"] else 0.0
                ),
                "reward_per_shown": counters["reward"] / shown if shown else 0.0,
            }
        return report

    def reset_stats(self) -> None:
        """Forget the per-policy counters (e.g. after a warm-up)."""
        self._stats.clear()
