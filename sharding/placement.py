"""Expert placement: which device holds which expert (survey section 4.1.2).

A :class:`Placement` maps the ``num_devices * slots_per_device`` expert *slots*
of an expert-parallel layer to experts. Device ``d`` holds slots
``d*spd .. d*spd+spd-1`` (``spd`` = slots per device), so the stacked expert
weights of a layer become ``w[slot_expert]`` sharded evenly along the expert
dimension. An expert may own several slots (a replica on several devices); its
tokens are then split between the replicas (token index modulo replica count).

* :func:`contiguous_placement` — experts ``0..E-1`` in order (the default
  layout of a sharded expert dimension);
* :func:`balanced_placement` — greedy longest-processing-time (LPT) assignment
  of measured expert loads so that the busiest device's load is as small as
  possible, with optional replication of the hottest experts (EPLB / Lazarus
  style: each extra replica goes to the expert with the highest load per
  replica).
"""
from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["Placement", "PlacementError", "contiguous_placement", "balanced_placement", "device_loads",
           "load_summary"]


class PlacementError(ValueError):
    """Experts cannot be laid out on the devices as asked."""


@dataclasses.dataclass(frozen=True)
class Placement:
    """Slot -> expert table of one expert-parallel layer.

    Attributes:
      num_experts: experts of the layer (E).
      num_devices: devices along the expert mesh axis (n).
      slots_per_device: expert slots each device holds (spd).
      slot_expert: length ``n*spd``; the expert held by each slot.
    """

    num_experts: int
    num_devices: int
    slots_per_device: int
    slot_expert: tuple[int, ...]

    def __post_init__(self):
        if len(self.slot_expert) != self.num_devices * self.slots_per_device:
            raise PlacementError(f"placement: {len(self.slot_expert)} slots for {self.num_devices} devices x "
                                 f"{self.slots_per_device} slots per device")
        held = set(self.slot_expert)
        missing = sorted(set(range(self.num_experts)) - held)
        if missing:
            raise PlacementError(f"placement: experts {missing[:8]} have no slot; every expert needs one")
        if not held <= set(range(self.num_experts)):
            raise PlacementError(f"placement: slot table names experts outside 0..{self.num_experts - 1}")

    @property
    def num_slots(self) -> int:
        return len(self.slot_expert)

    @property
    def is_identity(self) -> bool:
        """Slots hold experts 0..E-1 in order (no permutation, no replicas)."""
        return self.slot_expert == tuple(range(self.num_experts))

    def replicas(self) -> list[list[int]]:
        """For each expert, the slots that hold it (in increasing order)."""
        out: list[list[int]] = [[] for _ in range(self.num_experts)]
        for slot, e in enumerate(self.slot_expert):
            out[e].append(slot)
        return out

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """``(replica_count [E] int32, replica_slots [E, R] int32)`` for routing tokens to slots."""
        reps = self.replicas()
        r_max = max(len(r) for r in reps)
        slots = np.array([r + [r[0]] * (r_max - len(r)) for r in reps], np.int32)
        return np.array([len(r) for r in reps], np.int32), slots

    def device_experts(self) -> list[list[int]]:
        """The experts each device holds."""
        s = self.slots_per_device
        return [list(self.slot_expert[d * s:(d + 1) * s]) for d in range(self.num_devices)]


def _slots_per_device(num_experts: int, num_devices: int, replicate_hot: int) -> int:
    if num_devices < 1:
        raise PlacementError(f"placement: need at least one device, got {num_devices}")
    if replicate_hot < 0:
        raise PlacementError(f"placement: replicate_hot must be >= 0, got {replicate_hot}")
    if replicate_hot == 0 and num_experts % num_devices:
        raise PlacementError(
            f"{num_experts} experts do not divide evenly over {num_devices} devices; use a mesh axis whose size "
            f"divides {num_experts}, or replicate hot experts (replicate_hot >= "
            f"{num_devices - num_experts % num_devices}) so that every device holds the same number of slots")
    return math.ceil((num_experts + replicate_hot) / num_devices)


def _replica_counts(loads: np.ndarray, num_slots: int, num_devices: int) -> np.ndarray:
    """Give extra slots, one at a time, to the expert with the highest load per replica."""
    e = len(loads)
    counts = np.ones(e, np.int64)
    heap = [(-float(loads[i]), i) for i in range(e)]
    heapq.heapify(heap)
    for _ in range(num_slots - e):
        while True:
            if not heap:
                raise PlacementError(f"placement: {num_slots} slots cannot be filled with at most {num_devices} "
                                     f"replicas of each of {e} experts; lower replicate_hot")
            _, i = heapq.heappop(heap)
            if counts[i] < num_devices:  # more replicas than devices cannot help
                break
        counts[i] += 1
        if counts[i] < num_devices:
            heapq.heappush(heap, (-float(loads[i]) / counts[i], i))
    return counts


def contiguous_placement(num_experts: int, num_devices: int, replicate_hot: int = 0,
                         loads: Sequence[float] | None = None) -> Placement:
    """Experts in index order; extra replica slots (if any) go to the hottest experts, appended at the end."""
    spd = _slots_per_device(num_experts, num_devices, replicate_hot)
    total = spd * num_devices
    loads_arr = np.ones(num_experts) if loads is None else np.asarray(loads, np.float64)
    counts = _replica_counts(loads_arr, total, num_devices)
    table = list(range(num_experts))
    for e in range(num_experts):
        table += [e] * int(counts[e] - 1)
    return Placement(num_experts, num_devices, spd, tuple(table))


def balanced_placement(loads: Sequence[float], num_devices: int, replicate_hot: int = 0) -> Placement:
    """Greedy LPT placement minimising the busiest device's load.

    ``loads[e]`` is the measured work of expert ``e`` (e.g. routed tokens on
    calibration data). Replicas of one expert go to distinct devices and split
    its load evenly. Every device receives exactly ``slots_per_device`` slots.
    """
    loads_arr = np.asarray(loads, np.float64)
    if loads_arr.ndim != 1 or not len(loads_arr):
        raise PlacementError(f"balanced_placement: loads must be a 1-D list of per-expert loads, got shape "
                             f"{loads_arr.shape}")
    if np.any(loads_arr < 0) or not np.all(np.isfinite(loads_arr)):
        raise PlacementError("balanced_placement: loads must be finite and non-negative")
    e = len(loads_arr)
    spd = _slots_per_device(e, num_devices, replicate_hot)
    counts = _replica_counts(loads_arr, spd * num_devices, num_devices)
    items = [(loads_arr[i] / counts[i], i) for i in range(e) for _ in range(int(counts[i]))]
    items.sort(key=lambda t: (-t[0], t[1]))
    dev_load = np.zeros(num_devices)
    dev_items: list[list[int]] = [[] for _ in range(num_devices)]
    for load, expert in items:
        best = None
        for d in range(num_devices):
            if len(dev_items[d]) >= spd or expert in dev_items[d]:
                continue
            if best is None or dev_load[d] < dev_load[best] - 1e-12:
                best = d
        if best is None:  # only possible when replicas crowd the last free slots; relax distinctness
            best = min((d for d in range(num_devices) if len(dev_items[d]) < spd), key=lambda d: dev_load[d])
        dev_items[best].append(expert)
        dev_load[best] += load
    share = {i: loads_arr[i] / counts[i] for i in range(e)}
    _refine_by_swaps(dev_items, share)
    table = tuple(x for d in range(num_devices) for x in sorted(dev_items[d]))
    return Placement(e, num_devices, spd, table)


def _refine_by_swaps(dev_items: list[list[int]], share: dict[int, float], max_rounds: int = 200) -> None:
    """Local search after LPT: swap a slot of the busiest device with one elsewhere while that lowers the
    busier of the two (LPT alone can be beaten, e.g. on two devices with similar loads)."""
    def load(d):
        return sum(share[x] for x in dev_items[d])

    for _ in range(max_rounds):
        loads = [load(d) for d in range(len(dev_items))]
        hi = int(np.argmax(loads))
        best = None  # (new max of the pair, device, index on hi, index on other)
        for d in range(len(dev_items)):
            if d == hi:
                continue
            for i, a in enumerate(dev_items[hi]):
                for j, b in enumerate(dev_items[d]):
                    if a == b or (b in dev_items[hi]) or (a in dev_items[d]):
                        continue  # keep replicas of one expert on distinct devices
                    delta = share[a] - share[b]
                    pair_max = max(loads[hi] - delta, loads[d] + delta)
                    if pair_max < loads[hi] - 1e-9 and (best is None or pair_max < best[0]):
                        best = (pair_max, d, i, j)
        if best is None:
            return
        _, d, i, j = best
        dev_items[hi][i], dev_items[d][j] = dev_items[d][j], dev_items[hi][i]


def device_loads(placement: Placement, loads: Sequence[float]) -> np.ndarray:
    """Load of each device: the sum of its slots' shares (an expert's load split evenly over its replicas)."""
    loads_arr = np.asarray(loads, np.float64)
    counts = np.bincount(np.asarray(placement.slot_expert), minlength=placement.num_experts)
    per_slot = loads_arr[np.asarray(placement.slot_expert)] / counts[np.asarray(placement.slot_expert)]
    return per_slot.reshape(placement.num_devices, placement.slots_per_device).sum(1)


def load_summary(placement: Placement, loads: Sequence[float]) -> dict[str, float]:
    """``max``, ``mean`` and ``imbalance`` (= max / mean) of the device loads."""
    d = device_loads(placement, loads)
    mean = float(d.mean())
    return {"max": float(d.max()), "mean": mean, "imbalance": float(d.max() / mean) if mean > 0 else 1.0}
