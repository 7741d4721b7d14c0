"""A small thread-safe LRU for the store's decoded files; only for speed (its keys carry file identities)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, Literal, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

CacheEvent = Literal["hit", "miss", "put"]
# told of every lookup ("hit" | "miss") and every value read from disk and offered to the cache ("put"),
# e.g. serving's metrics (docs/metrics.md); called outside the cache's lock, must be cheap and never raise
CacheEventHook = Callable[[CacheEvent], None]
# a store's hook over its several caches: (cache name, event)
StoreCacheHook = Callable[[str, CacheEvent], None]


def named_hook(hook: StoreCacheHook | None, name: str) -> CacheEventHook | None:
    """``hook`` bound to the cache ``name`` (None stays None)."""
    if hook is None:
        return None
    return lambda event: hook(name, event)


class LRUCache(Generic[K, V]):
    """At most ``max_entries`` values (0: nothing is kept), the least recently used dropped first.
    ``on_event`` is told of each hit, miss and put (also with ``max_entries`` 0)."""

    def __init__(self, max_entries: int, *, on_event: CacheEventHook | None = None) -> None:
        self._max = max(0, int(max_entries))
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self._on_event = on_event

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
        if self._on_event is not None:
            self._on_event("miss" if value is None else "hit")
        return value

    def put(self, key: K, value: V) -> None:
        if self._on_event is not None:
            self._on_event("put")
        if self._max == 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self._max:
                self._data.popitem(last=False)
