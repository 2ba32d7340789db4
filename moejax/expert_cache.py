"""Which experts stay resident: a byte-budgeted cache with LRU, LFU and profile policies.

The cache only does bookkeeping (keys, sizes, recency, counts); the offload
runtime (:mod:`moejax.offload`) owns the device buffers and asks it what to
keep. A key is ``(site, expert)``: the expert op (layer) and the expert.

Policies choose the victim among evictable entries:

* ``lru``: the least recently used;
* ``lfu``: the least often used so far (ties: least recently used);
* ``profile``: the lowest routing-profile load (the fraction of routing slots
  the expert received on calibration text), ties least recently used. It keeps
  the experts that are hot on average and ignores short bursts;
* ``next-use``: the expert whose layer runs furthest in the future (decode
  visits the layers in a fixed cycle, so this is Belady's choice among layers),
  ties least recently used. LRU evicts exactly the experts the next token needs
  first when the cache is smaller than one token's working set; this keeps them.
  Keys must be ``(site, expert)`` and the runtime sets :attr:`ExpertCache.cursor`.
"""
from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping

__all__ = ["POLICIES", "ExpertCache"]

POLICIES = ("lru", "lfu", "profile", "next-use")

Key = Hashable


class ExpertCache:
    """Bookkeeping of resident experts under a byte ``capacity``.

    ``lookup(key)`` answers hit or miss and refreshes recency and frequency;
    ``admit(key, nbytes, protected)`` makes room (evicting victims the policy
    picks, never a ``protected`` key) and returns the evicted keys, or ``None``
    when the entry cannot fit (then it is used once and not kept).
    """

    def __init__(self, capacity: int, policy: str = "lru", profile: Mapping[Key, float] | None = None):
        if policy not in POLICIES:
            raise ValueError(f"cache policy {policy!r} is not one of {', '.join(POLICIES)}")
        if policy == "profile" and profile is None:
            raise ValueError("the profile cache policy needs a routing profile (expert loads)")
        if capacity < 0:
            raise ValueError(f"cache capacity must be >= 0 bytes, got {capacity}")
        self.capacity = int(capacity)
        self.policy = policy
        self.profile = dict(profile or {})
        self.sizes: dict[Key, int] = {}
        self._last_use: dict[Key, int] = {}
        self._uses: dict[Key, int] = {}
        self._clock = 0
        self.cursor: tuple[int, int] = (0, 1)  # (site running now, number of sites): for next-use
        self.pinned: set[Key] = set()  # never evicted

    @property
    def used(self) -> int:
        return sum(self.sizes.values())

    def __contains__(self, key: Key) -> bool:
        return key in self.sizes

    def lookup(self, key: Key) -> bool:
        """Whether ``key`` is resident; marks the use (recency and count). Callers count hits."""
        self._clock += 1
        self._last_use[key] = self._clock
        self._uses[key] = self._uses.get(key, 0) + 1
        return key in self.sizes

    def _rank(self, key: Key) -> tuple:
        """Smaller ranks are evicted first."""
        recency = self._last_use.get(key, 0)
        if self.policy == "lfu":
            return (self._uses.get(key, 0), recency)
        if self.policy == "profile":
            return (self.profile.get(key, 0.0), recency)
        if self.policy == "next-use":
            now, sites = self.cursor
            return (-((key[0] - now) % sites), recency)  # the layer due last goes first
        return (recency,)

    def admit(self, key: Key, nbytes: int, protected: Iterable[Key] = (), cold: bool = False) -> list[Key] | None:
        """Make ``key`` resident; returns the evicted keys, or None if it cannot fit beside ``protected``.

        ``cold`` (a prefetch) enters as the next victim until a lookup uses it, so a wrong
        prediction costs a read but does not push out an expert that is in use.
        """
        if key in self.sizes:
            return []
        protected = set(protected) | self.pinned
        free = self.capacity - self.used
        if nbytes > free:
            candidates = sorted((k for k in self.sizes if k not in protected), key=self._rank)
            room = free + sum(self.sizes[k] for k in candidates)
            if nbytes > room:
                return None
            evicted = []
            for victim in candidates:
                if free >= nbytes:
                    break
                free += self.sizes.pop(victim)
                evicted.append(victim)
        else:
            evicted = []
        self.sizes[key] = int(nbytes)
        if cold:
            self._last_use[key] = 0
            self._uses.setdefault(key, 0)
        return evicted

    def discard(self, key: Key) -> None:
        self.sizes.pop(key, None)
