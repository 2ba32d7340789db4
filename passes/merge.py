"""``merge``: cluster the experts of each layer and merge each cluster into one (survey section 3.2.1).

:class:`MergeExperts` groups the experts of every MoE layer into ``num_experts``
clusters by hierarchical clustering with average linkage (HC-SMoE) on one of
three similarities (cosine distance between):

* ``output``: the experts' outputs on the routing profile's hidden-state sample (HC-SMoE);
* ``router``: the experts' router probabilities on that sample (MC-SMoE's router-logit similarity);
* ``weight``: the experts' flattened weights.

``method=reap`` chooses clusters differently: experts are absorbed one at a time
into the expert whose output best stands in for theirs, cheapest first, where the
cost is REAP's router-weighted saliency of the output difference
(:func:`absorption_costs`, :func:`absorb_clusters`). Average linkage joins the
most similar experts even when both carry many tokens; absorption merges away
the experts that matter least, as REAP pruning drops them, but keeps their tokens
served by a near neighbour instead of by the router's next choice.

Each cluster becomes one expert whose weights are the routing-frequency-weighted
average of its members' weights, after their hidden units are permuted to line
up with the cluster's most used member (MC-SMoE's alignment; ``align=false``
averages as is), or with ``weights=dominant`` that most used member's own weights
(M-SMoE's dominant expert): the refit then folds the others' outputs into it
without first blurring it with weights trained for other tokens. The router keeps
all its columns; the route op's ``Routing.expert_map`` maps every old expert to
its merged expert, and the weights of two selected experts that land in the same
merged expert add up. With ``distinct=true`` a token selects k distinct merged
experts instead (``Routing.distinct_merged``: each merged expert competes with
its best column), so it keeps k experts' worth of compute.

With ``refit=true`` each merged expert's output matrix is then refitted by least
squares on the profile's hidden-state sample, so that the merged expert reproduces,
for the tokens that picked its members, what those members produced
(:func:`refit_output_matrix`; MergeMoE / NAEE-style repair). ``keep=FRACTION`` merges
to that fraction of each layer's experts.

``budget=global`` keeps the same total of merged experts but spreads it over the
layers by measured sensitivity, as ``prune(budget=global)`` does: each next merge
is taken from the layer whose output on the profile's sample moves least
(relative squared error of the merged layer, refit and routing included;
unrolled layers only).

Layers stacked under ``scan`` share one static ``expert_map``: per layer the
router columns (and selection bias) are permuted so that each layer's clusters
sit in the same canonical blocks. That needs every layer's clusters to have the
same sizes; ``balanced=true`` (cluster sizes capped at ceil(E/M)) makes that
the usual case, and the pass says so when it is not.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np

from moejax import analysis, dialect
from moejax.passes.prune import (BUDGETS, MoELayer, _check_target, _with_profile, allocate_global,
                                 apply_expert_rewrite, check_float_experts, dense_gates, expert_outputs,
                                 find_moe_layers, layer_gates, layer_profile)
from moejax.pipeline import Pass, PassContext, PassError, register_pass
from moejax.program import Program

__all__ = ["MergeExperts", "average_linkage", "absorption_costs", "absorb_clusters", "cosine_distances",
           "merge_weights", "merge_expert_weights", "align_hidden_units", "refit_output_matrix"]

SIMILARITIES = ("output", "router", "weight")
METHODS = ("linkage", "reap")  # how clusters are chosen
STARTS = ("average", "dominant")  # what a merged expert's weights start from


def cosine_distances(features: np.ndarray) -> np.ndarray:
    """``1 - cos`` between the rows of ``features [E, m]`` (zero rows are at distance 1)."""
    f = np.asarray(features, np.float64).reshape(features.shape[0], -1)
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    unit = f / np.maximum(norms, 1e-30)
    dist = 1.0 - unit @ unit.T
    np.fill_diagonal(dist, 0.0)
    return np.clip(dist, 0.0, 2.0)


def _join_greedily(n: int, n_clusters: int, max_size: int | None, cost: Callable[[int, int, dict], float],
                   symmetric: bool, who: str) -> list[list[int]]:
    """Join ``n`` singletons, the cheapest join first, until ``n_clusters`` clusters remain.

    Clusters are kept by key (a member); ``cost(a, b, clusters)`` prices moving cluster
    ``a`` into cluster ``b``, which keeps its key. ``symmetric``: the cost is the same
    both ways, so each pair is priced once and the smaller key is kept (a cluster's
    key stays its smallest member, and ties go to the pair with the smallest members).
    No cluster grows past ``max_size``.
    Returns clusters as sorted id lists, ordered by their smallest member.
    """
    if not 1 <= n_clusters <= n:
        raise ValueError(f"{who}: n_clusters must be in [1, {n}], got {n_clusters}")
    clusters = {i: [i] for i in range(n)}
    while len(clusters) > n_clusters:
        best = None
        for a in clusters:
            for b in clusters:
                if b == a or (symmetric and b < a) or (max_size is not None
                                                        and len(clusters[a]) + len(clusters[b]) > max_size):
                    continue
                c = cost(a, b, clusters)
                if best is None or c < best[0] - 1e-12:
                    best = (c, a, b)
        if best is None:
            raise ValueError(f"{who}: cannot reach {n_clusters} clusters with clusters of at most {max_size} members")
        _, a, b = best
        keep, gone = (a, b) if symmetric else (b, a)
        clusters[keep] = sorted(clusters[keep] + clusters.pop(gone))
    return sorted(clusters.values(), key=lambda c: c[0])


def average_linkage(dist: np.ndarray, n_clusters: int, max_size: int | None = None) -> list[list[int]]:
    """Agglomerative clustering with average linkage down to ``n_clusters`` clusters.

    Repeatedly joins the two clusters with the smallest mean pairwise distance
    (ties: the pair with the smallest member ids), optionally never forming a
    cluster larger than ``max_size``. Returns clusters as sorted id lists,
    ordered by their smallest member.
    """
    return _join_greedily(dist.shape[0], n_clusters, max_size,
                          lambda a, b, cl: float(dist[np.ix_(cl[a], cl[b])].mean()), True, "average_linkage")


def absorption_costs(gates: np.ndarray, picked: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """REAP-style cost ``[E, E]`` of serving expert ``i``'s tokens with expert ``j``'s output.

    ``cost[i, j]`` is the mean over the tokens routed to ``i`` of ``g_i * |E_i(x) - E_j(x)|``:
    REAP's saliency (arXiv 2510.13999) of the difference instead of the output, so
    it is below REAP's saliency of ``i`` (what pruning it loses, before the router
    renormalises) where ``E_j`` is nearer ``E_i`` than zero is.
    ``gates``/``picked`` ``[n, E]`` as :func:`~moejax.passes.prune.dense_gates`
    returns them; ``outputs [E, n, d]`` every expert's output. An expert no token
    routes to costs 0 to absorb anywhere.
    """
    e = outputs.shape[0]
    cost = np.zeros((e, e))
    for i in range(e):
        rows = np.flatnonzero(picked[:, i])
        if rows.size:
            diff = np.linalg.norm(outputs[:, rows] - outputs[i, rows], axis=-1)  # [E, routed]
            cost[i] = diff @ gates[rows, i] / rows.size
    return cost


def absorb_clusters(cost: np.ndarray, n_clusters: int, max_size: int | None = None) -> list[list[int]]:
    """Greedily absorb experts into others until ``n_clusters`` remain (REAP-guided merging).

    Every cluster is served by one of its members, its centre; the merge cost is
    the sum over experts of ``cost[expert, its centre]`` (:func:`absorption_costs`).
    Each step joins the two clusters, under the centre of one of them, that raise
    that sum least (a single expert joins at ``cost[i, centre]``); clusters never
    exceed ``max_size``. So the experts merged away are those whose router-weighted
    output the rest can best stand in for, and the experts that matter most stay
    whole. Returns clusters as sorted id lists, ordered by their smallest member.
    """
    def rise(a: int, b: int, clusters: dict) -> float:  # cluster a moves under centre b
        return float(cost[clusters[a], b].sum() - cost[clusters[a], a].sum())

    return _join_greedily(cost.shape[0], n_clusters, max_size, rise, False, "absorb_clusters")


def merge_weights(weights: np.ndarray, clusters: list[list[int]], freq: np.ndarray) -> np.ndarray:
    """Frequency-weighted average of ``weights [E, ...]`` over each cluster: ``[M, ...]``.

    A cluster whose members were never routed to is averaged uniformly.
    """
    out = []
    for members in clusters:
        f = np.asarray(freq, np.float64)[members]
        f = f / f.sum() if f.sum() > 0 else np.full(len(members), 1.0 / len(members))
        out.append(np.tensordot(f, np.asarray(weights, np.float64)[members], axes=1))
    return np.stack(out).astype(np.asarray(weights).dtype)


def _match(sim: np.ndarray) -> np.ndarray:
    """Column matched to each row maximising total similarity (Hungarian; greedy without scipy)."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # greedy fallback: best remaining pair first
        n = sim.shape[0]
        out = np.full(n, -1)
        used_r, used_c = set(), set()
        for flat in np.argsort(-sim, axis=None):
            r, c = divmod(int(flat), n)
            if r not in used_r and c not in used_c:
                out[r] = c
                used_r.add(r)
                used_c.add(c)
        return out
    rows, cols = linear_sum_assignment(-sim)
    return cols[np.argsort(rows)]


def align_hidden_units(anchor: list[np.ndarray], other: list[np.ndarray]) -> list[np.ndarray]:
    """Permute the hidden units of expert ``other`` to line up with ``anchor`` (MC-SMoE alignment).

    Experts are ``[in_0 [d,f], ..., out [f,d]]``; a hidden unit is a column of the
    input matrices plus a row of the output matrix. Units are matched by the dot
    product of those concatenated vectors.
    """
    perm = _match(_units(anchor) @ _units(other).T)
    return [m[:, perm] for m in other[:-1]] + [other[-1][perm]]


def _units(mats: list[np.ndarray]) -> np.ndarray:
    """Each hidden unit's weights ``[f, features]``: its input-matrix columns and output-matrix row."""
    return np.concatenate([m.T for m in mats[:-1]] + [mats[-1]], axis=1)


def _most_used(members: list[int], freq: np.ndarray) -> int:
    """The cluster member routed to most often (the first on a tie): the alignment anchor and dominant expert."""
    return members[int(np.argmax(np.asarray(freq)[members]))]


def merge_expert_weights(mats: list[np.ndarray], clusters: list[list[int]], freq: np.ndarray,
                         align: bool = True, n_matrices: int | None = None,
                         start: str = "average") -> list[np.ndarray]:
    """Merge stacked expert weights ``[E, ...]`` per cluster into ``[M, ...]``.

    ``mats`` are the expert op's weights: ``n_matrices`` matrices (all of them when
    None), then optionally one bias per matrix (gpt-oss). With ``align``, each
    member's hidden units are first permuted to match the cluster's most frequently
    routed member (the input matrices' biases move with their units); then
    everything is averaged with :func:`merge_weights` (routing-frequency weights).
    ``start="dominant"`` takes the most frequently routed member's weights as they are.
    """
    if start == "dominant":
        dominant = [_most_used(members, freq) for members in clusters]
        return [np.asarray(m)[dominant] for m in mats]
    if not align:
        return [merge_weights(m, clusters, freq) for m in mats]
    n = len(mats) if n_matrices is None else n_matrices

    def aligned_member(ref: list[np.ndarray], e: int) -> list[np.ndarray]:
        own = [np.asarray(m[e], np.float64) for m in mats]
        units = align_hidden_units(ref[:n], own[:n])
        perm = _match(_units(ref[:n]) @ _units(own[:n]).T)
        biases = [b[perm] if i < n - 1 else b for i, b in enumerate(own[n:])]  # output bias: no hidden axis
        return units + biases

    merged = [[] for _ in mats]
    for members in clusters:
        anchor = _most_used(members, freq)
        ref = [np.asarray(m[anchor], np.float64) for m in mats]
        aligned = [ref if e == anchor else aligned_member(ref, e) for e in members]
        for i, m in enumerate(mats):
            stack = np.stack([a[i] for a in aligned])
            merged[i].append(merge_weights(stack, [list(range(len(members)))], np.asarray(freq)[members])[0])
    return [np.stack(ms).astype(np.asarray(m).dtype) for ms, m in zip(merged, mats)]


def refit_output_matrix(x: np.ndarray, gates: np.ndarray, member_outputs: np.ndarray, merged: list[np.ndarray],
                        activation: str, ridge: float = 0.1) -> np.ndarray:
    """Least-squares refit of a merged expert's output matrix (MergeMoE / NAEE-style repair).

    After merging, a token that picked members ``j`` of the cluster with gate weights
    ``g_tj`` gets ``(sum_j g_tj) * merged(x_t)`` where it used to get
    ``sum_j g_tj * E_j(x_t)``. With the merged input matrices fixed, the merged output
    is linear in the output matrix ``W``, so the best ``W`` on the calibration tokens is a
    least-squares solve: ``min sum_t |s_t h_t W - T_t|^2 + lam |W - W_avg|^2``, with
    ``h_t`` the merged hidden state, ``s_t = sum_j g_tj`` and ``T_t`` the old output.
    The ridge pulls towards the averaged ``W_avg`` where few tokens constrain it
    (``lam = ridge * mean diagonal of the normal matrix``).

    ``x [n, d]``; ``gates [n, m]`` the members' gate weights per token (0: not picked);
    ``member_outputs [m, n, d]``; ``merged`` the merged matrices (inputs..., output).
    Returns the refitted output matrix ``[f, d]``.
    """
    s = gates.sum(1)
    used = s > 0
    w_avg = np.asarray(merged[-1], np.float64)
    if not used.any():
        return merged[-1]
    xs = jnp.asarray(x, jnp.float32)  # every token, so that one compiled shape serves every cluster
    act = dialect.activation_fn(activation)
    h = np.asarray(act(*(xs @ jnp.asarray(m, jnp.float32) for m in merged[:-1])), np.float64)[used]  # [n_used, f]
    a = s[used, None] * h
    target = np.einsum("tm,mtd->td", gates[used], np.asarray(member_outputs, np.float64)[:, used])
    normal = a.T @ a
    lam = ridge * max(float(np.mean(np.diag(normal))), 1e-12)
    delta = np.linalg.solve(normal + lam * np.eye(normal.shape[0]), a.T @ (target - a @ w_avg))
    return (w_avg + delta).astype(np.asarray(merged[-1]).dtype)


class _LazyCurve(Sequence):
    """A layer's error per expert count (:func:`allocate_global`), measured when first asked for."""

    def __init__(self, size: int, measure: Callable[[int], float]):
        self._size, self._measure, self._known = size, measure, {}

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, count: int) -> float:
        if count not in self._known:
            self._known[count] = self._measure(count)
        return self._known[count]


@register_pass
@dataclasses.dataclass(frozen=True)
class MergeExperts(Pass):
    """Merge the experts of each MoE layer into ``num_experts`` clusters (HC-SMoE / MC-SMoE).

    Options:
      num_experts: merged experts per layer (same for every layer); or
      keep: the fraction of each layer's experts left after merging (rounded).
      method: ``linkage`` (hierarchical clustering with average linkage on
        ``similarity``) or ``reap`` (absorb the experts whose router-weighted
        output a neighbour stands in for best; see the module doc).
      similarity: what clusters experts with ``method=linkage`` (cosine distance): their outputs on the
        profile's sample (``output``), their router probabilities (``router``) or
        their weights (``weight``); see the module doc.
      balanced: cap cluster sizes at ceil(E / num_experts) (keeps scanned layers
        stackable and avoids one giant cluster).
      align: before averaging, permute each member's hidden units to match the
        cluster's most used expert (MC-SMoE); experts trained from different
        initialisations have unrelated hidden-unit orders.
      weights: what a merged expert starts from: ``average`` (its members'
        frequency-weighted average) or ``dominant`` (its most used member's
        weights; with ``refit=true`` the output matrix is then fitted to all
        members' outputs).
      distinct: route every token to k distinct merged experts (each by its
        best column's score) instead of adding up the weights of selected columns
        that land in one merged expert.
      budget: ``uniform`` (every layer merges to the same count) or ``global``
        (the same total, spread over layers by measured sensitivity; unrolled
        layers only).
      refit: after merging, refit each merged expert's output matrix by least
        squares so that, on the profile's tokens, it reproduces what the experts it
        replaces produced for the tokens that picked them (see
        :func:`refit_output_matrix`).

    Needs a routing profile (``profile`` before it). Pipeline spelling:
    ``merge(num_experts=6,similarity=output)``.
    """

    name: ClassVar[str] = "merge"
    exact: ClassVar[bool] = False
    needs_stacked_experts: ClassVar[bool] = True
    needs: ClassVar[tuple[str, ...]] = (analysis.RoutingProfile.key,)
    provides: ClassVar[tuple[str, ...]] = (analysis.MergePlan.key,)
    # What __post_init__ and check accept; shown by `moejax passes`.
    option_ranges: ClassVar[Mapping[str, str]] = {
        "num_experts": "integer >= 1, at most the layer's experts",
        "method": "linkage or reap",
        "similarity": "output, router or weight (method=linkage)",
        "balanced": "true or false",
        "align": "true or false",
        "weights": "average or dominant",
        "keep": "number in (0, 1]: fraction of each layer's experts left",
        "refit": "true or false",
        "distinct": "true or false",
        "budget": "uniform or global",
    }

    num_experts: int | None = None
    similarity: str = "output"
    method: str = "linkage"
    balanced: bool = False
    align: bool = True
    keep: float | None = None
    refit: bool = False
    weights: str = "average"
    distinct: bool = False
    budget: str = "uniform"

    def __post_init__(self):
        if (self.num_experts is None) == (self.keep is None):
            raise ValueError("merge needs exactly one of num_experts=N (merged experts per layer) or keep=FRACTION, "
                             "e.g. merge(num_experts=6) or merge(keep=0.75)")
        if self.num_experts is not None and (isinstance(self.num_experts, bool) or not isinstance(self.num_experts, int)
                                             or self.num_experts < 1):
            raise ValueError(f"merge: num_experts must be an integer >= 1, got {self.num_experts!r}")
        if self.keep is not None and (isinstance(self.keep, bool) or not isinstance(self.keep, (int, float))
                                      or not 0 < self.keep <= 1):
            raise ValueError(f"merge: keep must be a fraction in (0, 1], got {self.keep!r}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"merge: similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if self.method not in METHODS:
            raise ValueError(f"merge: method must be one of {METHODS}, got {self.method!r}")
        if self.method == "reap" and self.similarity != "output":
            raise ValueError("merge: method=reap scores experts by their outputs; similarity= applies to "
                             "method=linkage only, so drop it")
        if self.budget not in BUDGETS:
            raise ValueError(f"merge: budget must be one of {BUDGETS}, got {self.budget!r}")
        if self.weights not in STARTS:
            raise ValueError(f"merge: weights must be one of {STARTS}, got {self.weights!r}")

    def target(self, layer: MoELayer) -> int:
        """Merged experts ``layer`` ends with."""
        if self.num_experts is not None:
            return self.num_experts
        return max(1, min(layer.num_experts, round(self.keep * layer.num_experts)))

    def _needed_keys(self) -> tuple[str, ...]:
        if self.similarity in ("output", "router") or self.refit or self.budget == "global":  # (reap: output)
            return ("frequency", "inputs")
        return ("frequency",)

    def check(self, program: Program, ctx: PassContext) -> None:
        layers = find_moe_layers(program, self.name)
        check_float_experts(program, layers, self.name)
        for layer in layers.values():
            _check_target(layer, self.target(layer), self.name)
            if layer.stacked and layer.routing.expert_map is not None:
                raise PassError(f"merge: layer {layer.name!r} is stacked under scan and already merged; merging it "
                                "again needs a per-layer expert_map. Merge once to the final count, or unroll the "
                                "layers (scan_layers=False)")
            if layer.stacked and self.budget == "global":
                raise PassError(f"merge: budget=global gives layers different expert counts, but layer "
                                f"{layer.name!r} is stacked under scan (one count for all); use budget=uniform "
                                "or unroll the layers (scan_layers=False)")
            if self.distinct and self.target(layer) < layer.routing.slots:
                raise PassError(f"merge: distinct=true routes each token to {layer.routing.slots} distinct merged "
                                f"experts, but layer {layer.name!r} would keep only {self.target(layer)}; merge to at "
                                f"least {layer.routing.slots} experts or drop distinct=true")
            if self.distinct and layer.routing.score == "sparsemixer":
                raise PassError(f"merge: distinct=true needs per-expert scores, but layer {layer.name!r} routes with "
                                "SparseMixer; drop distinct=true there")
            if self.refit and layer.routing.weight_on == "input":
                raise PassError(f"merge: refit=true fits on unscaled calibration tokens, but layer {layer.name!r} "
                                "applies routing weights to the expert input (Llama 4); use merge(refit=false) there")
            if self.refit and len(layer.experts) != (3 if dialect.is_gated(layer.activation) else 2):
                raise PassError(f"merge: refit=true fits an expert's matrices, but layer {layer.name!r} has expert "
                                "biases too (gpt-oss); use merge(refit=false) there")
            layer_profile(program, layer, self.name, self._needed_keys())

    # ---- clustering ----------------------------------------------------------
    def distances(self, program: Program, layer: MoELayer, s: int, entry: analysis.LayerRouting) -> np.ndarray:
        """Cosine distances ``[E, E]`` between the current experts of stack row ``s``."""
        if self.similarity == "weight":
            feats = [np.asarray(program.weights[p][s] if layer.stacked else program.weights[p], np.float32)
                     for p in layer.experts]
            return cosine_distances(np.concatenate([f.reshape(f.shape[0], -1) for f in feats], axis=1))
        x = np.asarray(entry.inputs[s], np.float32)
        if self.similarity == "output":
            return cosine_distances(expert_outputs(program, layer, s, x))
        router = np.asarray(program.weights[layer.router][s] if layer.stacked else program.weights[layer.router],
                            np.float32)
        logits = x @ router
        if layer.bias and layer.routing.bias_on_logits:  # gpt-oss: the router's own bias
            logits = logits + np.asarray(program.weights[layer.bias][s] if layer.stacked
                                         else program.weights[layer.bias], np.float32)
        # SparseMixer scores two masked softmaxes; the plain softmax of its logits stands in for it here.
        score = "softmax" if layer.routing.score == "sparsemixer" else layer.routing.score
        probs = np.asarray(dialect._scores(jnp.asarray(logits), score))  # [n, columns]
        if layer.routing.expert_map is not None:  # columns -> current (merged) experts
            table = np.zeros((layer.num_router, layer.num_experts), np.float32)
            table[np.arange(layer.num_router), list(layer.routing.expert_map)] = 1.0
            probs = probs @ table
        return cosine_distances(probs.T)

    def clusters(self, program: Program, layer: MoELayer, n: int | None = None) -> list[list[list[int]]]:
        """Clusters of the current experts, per stack row, ``n`` of them (default: the target count)."""
        n = self.target(layer) if n is None else n
        return [self._cluster(self._scores(program, layer, s), layer, n) for s in range(layer.stack_size(program))]

    def _scores(self, program: Program, layer: MoELayer, s: int) -> np.ndarray:
        """What clustering stack row ``s`` reads: absorption costs (``method=reap``) or distances."""
        entry = layer_profile(program, layer, self.name, self._needed_keys())
        if self.method == "reap":
            return self.absorption_costs(program, layer, s, entry)
        return self.distances(program, layer, s, entry)

    def _cluster(self, scores: np.ndarray, layer: MoELayer, n: int) -> list[list[int]]:
        cap = math.ceil(layer.num_experts / n) if self.balanced else None
        return (absorb_clusters if self.method == "reap" else average_linkage)(scores, n, cap)

    def _smallest(self, layer: MoELayer) -> int:
        """The fewest merged experts a layer may keep under a global budget."""
        return layer.routing.slots if self.distinct else 1

    def global_counts(self, program: Program, layers: Mapping[str, MoELayer]) -> dict[str, int]:
        """Merged experts per layer under ``budget=global``: the uniform total, spread by measured sensitivity.

        A layer's curve is the relative squared change of its output on the
        profile's sample at a count it could merge to, under the merged routing;
        it is measured only at the counts the allocation reaches (with
        ``distinct=true`` each is one more compiled route).
        """
        curves = {name: _LazyCurve(layer.num_experts + 1, self._merge_error(program, layer))
                  for name, layer in layers.items()}
        total = sum(self.target(layer) for layer in layers.values())
        return allocate_global(curves, total, {n: self._smallest(l) for n, l in layers.items()}, who=self.name)

    def _merge_error(self, program: Program, layer: MoELayer) -> Callable[[int], float]:
        """``error(n)``: the relative squared change of an unrolled layer's output when merged to ``n`` experts."""
        entry = layer_profile(program, layer, self.name, ("inputs", "frequency"))
        x = np.asarray(entry.inputs[0], np.float32)
        gates, _ = layer_gates(program, layer, 0, x)
        outputs = expert_outputs(program, layer, 0, x)
        mats = [np.asarray(program.weights[p]) for p in layer.experts]
        freq = np.asarray(entry.frequency, np.float64)
        router = np.asarray(program.weights[layer.router], np.float32)
        bias = np.asarray(program.weights[layer.bias], np.float32) if layer.bias else None
        full = np.einsum("ne,end->nd", gates, outputs)
        scores = self._scores(program, layer, 0)

        def error(n: int) -> float:
            if n == layer.num_experts:
                return 0.0
            clusters = self._cluster(scores, layer, n)
            if self.distinct:
                routing = dataclasses.replace(layer.routing, expert_map=self._expert_map(layer, clusters),
                                              distinct_merged=True)
                merged_gates = dense_gates(x, router, bias, routing, n)[0]
            else:  # the selected experts' weights add up where they land in one merged expert
                table = np.zeros((layer.num_experts, n))
                for j, members in enumerate(clusters):
                    table[members, j] = 1.0
                merged_gates = gates @ table
            merged = self._merged_row(program, layer, 0, clusters, mats, freq, (x, gates, outputs))
            merged_outputs = dialect.expert_ffn_math(jnp.asarray(x), [jnp.asarray(m, jnp.float32) for m in merged],
                                                     layer.activation)
            y = np.einsum("nm,mnd->nd", merged_gates, np.asarray(merged_outputs))
            return float(np.sum((y - full) ** 2)) / max(float(np.sum(full ** 2)), 1e-30)

        return error

    def _merged_row(self, program: Program, layer: MoELayer, s: int, clusters: list[list[int]],
                    mats: list[np.ndarray], freq: np.ndarray,
                    sample: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> list[np.ndarray]:
        """Stack row ``s``'s merged weights, one per cluster in order (refitted with ``refit=true``).

        ``mats``: the layer's expert weights; ``freq [S, E]``: the profile's routing
        frequencies; ``sample``: as :meth:`_refit` takes it.
        """
        n_matrices = 3 if dialect.is_gated(layer.activation) else 2
        merged = merge_expert_weights([m[s] if layer.stacked else m for m in mats], clusters, freq[s], self.align,
                                      n_matrices, self.weights)
        return self._refit(program, layer, s, clusters, merged, sample) if self.refit else merged

    @staticmethod
    def _expert_map(layer: MoELayer, clusters: list[list[int]]) -> tuple[int, ...]:
        """Router column -> merged expert, for an unrolled layer (through any earlier merge's map)."""
        owner = {e: j for j, members in enumerate(clusters) for e in members}
        old_map = layer.routing.expert_map or tuple(range(layer.num_router))
        return tuple(owner[old_map[c]] for c in range(layer.num_router))

    @staticmethod
    def absorption_costs(program: Program, layer: MoELayer, s: int, entry: analysis.LayerRouting) -> np.ndarray:
        """:func:`absorption_costs` of the current experts of stack row ``s`` on the profile's sample."""
        x = np.asarray(entry.inputs[s], np.float32)
        gates, picked = layer_gates(program, layer, s, x)
        return absorption_costs(gates, picked, expert_outputs(program, layer, s, x))

    # ---- rewriting -------------------------------------------------------------
    def run(self, program: Program, ctx: PassContext) -> Program:
        layers = find_moe_layers(program, self.name)
        step = ctx.step(self)
        shared = ctx.analysis.get(analysis.MergePlan, step)  # made by the first program of this optimize call
        targets = (self.global_counts(program, layers) if shared is None and self.budget == "global"
                   else {name: None for name in layers})
        plans = {name: (shared.layers.get(name) if shared is not None else None)
                 or analysis.MergePlan.clusters_of(self.clusters(program, layer, targets[name]))
                 for name, layer in layers.items()}
        chosen_by = self.similarity if self.method == "linkage" else "reap"
        plan = ctx.analysis.put(step, analysis.MergePlan(chosen_by, sum(len(r[0]) for r in plans.values()), plans))
        new_weights: dict[str, Any] = {}
        routings, counts, notes = {}, {}, {}
        for name, layer in layers.items():
            rows = [[list(c) for c in row] for row in plans[name]]
            freq = np.asarray(layer_profile(program, layer, self.name, ("frequency",)).frequency, np.float64)
            if layer.stacked:
                rows, perms, expert_map = self._canonical(layer, rows)
                new_weights[layer.router] = jnp.asarray(
                    np.stack([np.asarray(program.weights[layer.router][s])[:, p] for s, p in enumerate(perms)]))
                if layer.bias:
                    new_weights[layer.bias] = jnp.asarray(
                        np.stack([np.asarray(program.weights[layer.bias][s])[p] for s, p in enumerate(perms)]))
            else:
                expert_map = self._expert_map(layer, rows[0])
            mats = [np.asarray(program.weights[p]) for p in layer.experts]
            per_row = [self._merged_row(program, layer, s, rows[s], mats, freq) for s in range(len(rows))]
            for i, p in enumerate(layer.experts):
                new_weights[p] = jnp.asarray(np.stack([r[i] for r in per_row]) if layer.stacked else per_row[0][i])
            routings[name] = dataclasses.replace(layer.routing, expert_map=expert_map, distinct_merged=self.distinct)
            counts[name] = len(rows[0])
            notes[name] = rows if layer.stacked else rows[0]
        new = apply_expert_rewrite(program, layers, new_weights, routings, counts)
        return _with_profile(new, ctx, step, str(self), f"clusters per layer: {notes}", plan)

    def _refit(self, program: Program, layer: MoELayer, s: int, clusters: list[list[int]],
               merged: list[np.ndarray], sample: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
               ) -> list[np.ndarray]:
        """``merged`` (one stack row, clusters in order) with every cluster's output matrix refitted.

        ``sample``: the profile's tokens of row ``s``, their gates and the current
        experts' outputs on them, when the caller has them already.
        """
        if sample is None:
            x = np.asarray(layer_profile(program, layer, self.name, ("inputs",)).inputs[s], np.float32)
            sample = (x, layer_gates(program, layer, s, x)[0], expert_outputs(program, layer, s, x))
        x, gates, outputs = sample  # outputs [E, n, d]: the experts being replaced
        out = np.array(merged[-1])
        for j, members in enumerate(clusters):
            if len(members) > 1:
                out[j] = refit_output_matrix(x, gates[:, members], outputs[members], [m[j] for m in merged],
                                             layer.activation)
        return list(merged[:-1]) + [out]

    def _canonical(self, layer: MoELayer, rows: list[list[list[int]]]):
        """Order each stacked layer's clusters by size so one static expert_map serves every layer.

        Returns (clusters per row in canonical order, router column permutation per
        row, the shared expert_map).
        """
        sizes = [sorted((len(c) for c in row), reverse=True) for row in rows]
        if any(s != sizes[0] for s in sizes):
            detail = "; ".join(f"layer {i}: {s}" for i, s in enumerate(sizes))
            hint = "" if self.balanced else " Use merge(balanced=true) to give every layer the same cluster sizes, or"
            raise PassError(f"merge: layer {layer.name!r} is stacked under scan, where one static expert_map must "
                            f"serve every layer, but the layers' clusters have different sizes ({detail}).{hint} "
                            "unroll the layers (scan_layers=False)")
        ordered, perms = [], []
        for row in rows:
            row = sorted(row, key=lambda c: (-len(c), c[0]))
            ordered.append(row)
            perms.append([e for c in row for e in c])
        expert_map = tuple(j for j, c in enumerate(ordered[0]) for _ in c)
        return ordered, perms, expert_map
