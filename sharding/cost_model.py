"""A small cost model for overlapping all-to-all with expert compute (survey section 4.1.4).

One expert-parallel layer on one device is three stages per chunk of tokens:
send the chunk's token slots (all-to-all), run the local experts, send the
results back (all-to-all). With the layer's tokens cut into ``c`` chunks and
pipelined (Tutel / PipeMoE / ScheMoE), the stages of different chunks overlap:

    per chunk:  a = A / c per all-to-all,  b = B / c compute
    T(c) = (2a + b) + (c - 1) * max(2a, b) + c * overhead

where ``A`` is the exchange time of the whole layer in one direction,
``B`` the compute time of the whole layer, and ``overhead`` the fixed cost of a
chunk (two collective latencies plus a kernel launch). The dispatch of one
chunk and the combine of another share the device's links, so the steady state
is bounded by ``max(2a, b)`` per chunk: the first chunk's full latency plus one
bottleneck stage per further chunk. ``c = 1`` is no overlap (``2A + B``);
large ``c`` approaches ``max(2A, B)`` but pays ``c * overhead``. :func:`suggest_overlap_chunks` returns the ``c`` minimising
``T(c)`` among the divisors of the per-device token count.

Exchange bytes: each device sends ``tokens_per_device * k * (n-1)/n`` rows of
``d`` elements (slots routed to other devices, uniform routing) per direction.
Compute: ``tokens_per_device * flops_per_token`` (active expert FLOPs per token,
e.g. ``moejax.stats.program_stats(...)["active_expert_flops_per_token"]`` divided
by the number of MoE layers).
"""
from __future__ import annotations

__all__ = ["overlap_time", "suggest_overlap_chunks"]


def overlap_time(chunks: int, exchange_s: float, compute_s: float, overhead_s: float) -> float:
    """Pipelined layer time ``T(c)`` (seconds) for ``chunks`` chunks (see module docstring)."""
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    a, b = exchange_s / chunks, compute_s / chunks
    return (2 * a + b) + (chunks - 1) * max(2 * a, b) + chunks * overhead_s


def suggest_overlap_chunks(tokens: int, d: int, bytes_per_elem: int, flops_per_token: float, link_GBps: float,
                           device_TFLOPs: float, *, k: int = 2, num_devices: int = 8,
                           collective_latency_us: float = 10.0, launch_overhead_us: float = 5.0,
                           max_chunks: int = 16) -> tuple[int, dict[str, float]]:
    """The number of overlap chunks minimising the modelled layer time.

    Args:
      tokens: tokens of the layer per device (after sharding the batch).
      d: model width; bytes_per_elem: 2 for bf16, 4 for f32.
      flops_per_token: active expert FLOPs per token of this layer.
      link_GBps: per-device all-to-all bandwidth (GB/s); device_TFLOPs: achieved FLOP/s / 1e12.
      k: experts per token; num_devices: devices on the expert axis.
      collective_latency_us, launch_overhead_us: fixed costs per collective / per chunk.
    Returns:
      ``(c, details)`` with the modelled times (seconds) of ``c`` and of ``c = 1``.
    """
    if tokens < 1 or d < 1 or bytes_per_elem < 1 or link_GBps <= 0 or device_TFLOPs <= 0 or num_devices < 1:
        raise ValueError("suggest_overlap_chunks: tokens, d, bytes_per_elem, num_devices must be >= 1 and "
                         "link_GBps, device_TFLOPs > 0")
    remote = (num_devices - 1) / num_devices
    exchange_s = tokens * k * remote * d * bytes_per_elem / (link_GBps * 1e9)
    compute_s = tokens * flops_per_token / (device_TFLOPs * 1e12)
    overhead_s = (2 * collective_latency_us + launch_overhead_us) * 1e-6
    candidates = [c for c in range(1, max_chunks + 1) if tokens % c == 0]
    times = {c: overlap_time(c, exchange_s, compute_s, overhead_s) for c in candidates}
    best = min(candidates, key=lambda c: (times[c], c))
    return best, {"exchange_s": exchange_s, "compute_s": compute_s, "overhead_s": overhead_s,
                  "time_s": times[best], "time_no_overlap_s": times[1], "speedup": times[1] / times[best]}
