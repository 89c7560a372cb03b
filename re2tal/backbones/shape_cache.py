"""A per-backbone cache of tensors that depend only on shapes (attention masks, shift indices)."""

from __future__ import annotations

from typing import Callable, Hashable

from torch import Tensor


class ShapeCache:
    """Built once per key (shape, window, device ...), shared by all blocks of one backbone.

    Owned by a backbone instance, not by the module (no global state), and kept out of the
    state dict. Bounded, since a run sees few distinct input shapes but a long-lived process
    (evaluation over many clip lengths) might see many.
    """

    def __init__(self, max_items: int = 64) -> None:
        self.max_items = max_items
        self._items: dict[Hashable, Tensor] = {}

    def get(self, key: Hashable, make: Callable[[], Tensor]) -> Tensor:
        item = self._items.get(key)
        if item is None:
            if len(self._items) >= self.max_items:
                self._items.pop(next(iter(self._items)))  # oldest first
            item = self._items[key] = make()
        return item

    def __len__(self) -> int:
        return len(self._items)
