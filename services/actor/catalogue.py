"""The optional catalogue: which items the shop says must not be recommended (out of stock, delisted).

The catalogue topic is compacted and keyed by item_id; its latest record per item wins. An item is
unavailable when that record says ``available: false`` or is a tombstone (the item was deleted);
items never published are available. Pure logic: the actor feeds records in and asks for masks.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from schemas.codec import CATALOGUE_ITEMS, DecodeError
from schemas.messages import CatalogueItem


class Catalogue:
    """Unavailable item ids, updated record by record; ``version`` changes whenever the set does."""

    def __init__(self) -> None:
        self.unavailable: set[str] = set()
        self.version = 0

    def apply(self, key: bytes | None, value: bytes | None) -> DecodeError | None:
        """Apply one catalogue record; returns why it was unusable (for the dead-letter topic), or None."""
        if value is None:
            if not key:
                return DecodeError("catalogue_missing_key", "a catalogue tombstone needs the item_id as key")
            self._set(key.decode("utf-8", errors="backslashreplace"), available=False)
            return None
        item = CATALOGUE_ITEMS.decode(value)
        if isinstance(item, DecodeError):
            return item
        if key is not None and key != item.item_id.encode():
            # Compaction keeps the latest record per key: a record filed under another key would
            # later be compacted away with that key, so its meaning is ambiguous. Refuse it.
            return DecodeError(
                "catalogue_key_mismatch",
                f"record key {key.decode('utf-8', errors='backslashreplace')!r} is not its item_id "
                f"{item.item_id!r} (key catalogue records by item_id)",
            )
        self.update(item)
        return None

    def update(self, item: CatalogueItem) -> None:
        """Apply one decoded catalogue record."""
        self._set(item.item_id, available=item.available)

    def _set(self, item_id: str, *, available: bool) -> None:
        if available and item_id in self.unavailable:
            self.unavailable.discard(item_id)
            self.version += 1
        elif not available and item_id not in self.unavailable:
            self.unavailable.add(item_id)
            self.version += 1

    def mask(self, index: Mapping[str, int], base: np.ndarray) -> np.ndarray:
        """``base`` (A,) with the unavailable items of ``index`` (item id -> position) turned off."""
        mask = base.copy()  # (A,)
        for item_id in self.unavailable:
            position = index.get(item_id)
            if position is not None:
                mask[position] = False
        return mask
