"""Seeded synthetic multimodal knowledge graph with planted modality signal (the embedded default of ``dsom run``).

:func:`generate_synthetic` builds a :class:`~dsom.data.graph.KGDataset` in memory (no files; about a second at
the default size) whose feature modalities carry *known* signal, and keeps the ground truth in
``ds.extras["synthetic"]`` (a :class:`SyntheticTruth`). It is the default dataset of ``dsom run`` and the test bed
for the teacher-selection policy: the truth says, for every triple, which teachers should help.
:func:`synthetic_from_options` applies overrides of :data:`SYNTHETIC_DEFAULTS` (the ``--set`` path).

The output is a pure function of the parameters. Each part draws from its own child of
``SeedSequence(seed)`` (latent factors, relations, triples, splits, each modality's features), so changing, say,
``corrupt_frac`` or ``min_degree`` leaves the graph unchanged.

Generative model
----------------
**Latent factors.** There is one latent *block* per teacher: ``blocks = ("structure", *modalities)``. Entity e has,
in every block b, a complex factor ``u[e, b] ∈ C^k`` (``k = block_rank``) stored as ``latent[e, b] = [Re u, Im u]``.
Each block has its own clustering: ``u[e, b] = sqrt(ρ)·μ[b, c(e, b)] + sqrt(1 − ρ)·ε`` with ``num_clusters``
centres per block, ``ρ = cluster_strength`` and standard normal centres and noise. Blocks are independent of each
other, so a modality that reveals one block carries no information about another. ``clusters[:, 0]`` (the
structural cluster) doubles as the entity "type". Entity descriptions are neutral strings ("synthetic entity
number 17"), so re-encoding them as text cannot leak any planted factor.

**Relations.** Relation r depends on a set of blocks D_r: relations cycle through every single block and then every
pair of blocks (with the default four blocks: 10 patterns, so 12 single-block and 12 two-block relations among 24;
every block is used by 9 relations). The score is a ComplEx form restricted to D_r,
``s_r(h, t) = Σ_{b ∈ D_r} Re⟨u[h, b], w[r, b], conj(u[t, b])⟩``, with ``w[r, b] ∈ C^k`` random (magnitudes
U(0.5, 1.5), uniform phases) and each block's part scaled so it has variance ``1/|D_r|`` over random entity pairs
(``s_r`` has unit variance). A ComplEx teacher of rank ≥ ``k·|blocks|`` can represent every relation exactly.

**Triples.** The ``N = num_train + num_valid + num_test`` triples are spread over relations with random sizes
(half uniform, half Dirichlet). Entities have a log-normal *activity* ``a_e = exp(activity_sigma·ξ_e)``, which
makes degrees heavy-tailed (default: median train degree ≈ 11, a quarter of the entities below 5, hubs above 1000).
Every entity heads one triple of a random relation (so none is isolated); the other head slots of relation r are
drawn ∝ ``a_e`` times a relation-specific log-normal jitter. A head drawn K times for r gets K *distinct* tails,
sampled without replacement from

    p(t | h, r) = softmax_t(sharpness · s_r(h, t) + popularity · log a_t)    over all t ≠ h

(preferential attachment on top of the latent fit). Triples are therefore unique within and across splits and
there are no self-loops. With the defaults, ranking by the exact generating logits gives an unfiltered test MRR of
about 0.37 (relation-wise tail frequency alone: 0.07): the graph is learnable but not trivial.

**Splits.** ``unseen_frac·E`` low-degree entities (total degree 1–3) are held out: all their triples go to
valid/test, so they never occur in train (the "unseen entity" case). Every other entity that has a triple gets at
least one triple reserved for train. Valid and test are then filled with random triples and the rest is train.
``SyntheticTruth.unseen`` marks the entities of valid/test that have no train triple (exactly the held-out ones
unless the configuration is tiny).

**Features.** Modality m (teacher i = 1 + its position in ``modalities``) reveals block i and nothing else:
``X_m = [latent[:, i], ν] · M + feature_noise · ε`` with ``nuisance_dims`` entity-specific nuisance factors ν,
a random Gaussian ``M`` (columns of unit variance) and fresh noise ε; columns are then standardised over all
entities, so clean rows look like N(0, 1) just like imputed rows. Per modality, a random ``corrupt_frac`` of the
entities is **corrupted** (the row is replaced by the clean features of another random entity — plausible-looking
but pointing to the wrong latent factors; ``present`` stays True) and a disjoint random ``missing_frac`` is
**missing** (``present = False``, imputed by :meth:`ModalityTable.from_partial`, N(0, 1) by default). Tables are in
``ds.modalities[m]``. Feature dimensions default to text 64, image 48, numeric 24, other names 32.

Ground-truth labels
-------------------
For a triple (h, r, t) and the teacher pool ``teachers = ("structure", *modalities)`` (the labels' column order),
each teacher gets a label in {+1 helpful, 0 uninformative, −1 misleading}:

* **structure**: +1 if ``min(support(h), support(t)) ≥ min_degree``, else 0, where ``support(e)`` is the number of
  *train* triples containing e (as head or tail), not counting the triple itself when it is a train triple
  (leave-one-out, so a train triple's own memorisation does not count as evidence). The graph is generated from all
  blocks, so with enough support the structural embeddings can learn any relation. Structure is never −1.
* **modality m** (revealing block b): 0 if relation r does not depend on b (``relation_blocks[r, b]`` is False);
  otherwise −1 if h or t is corrupted in m (corruption wins over missing), else 0 if h or t is missing in m,
  else +1.

Remarks: a modality is labelled helpful on a two-block relation although it explains only half of the score; the
structure label ignores the relation (the graph carries every block). Labels are a planted *definition*, not a
measurement of trained teachers; they are what "planted agreement" of a policy is scored against.

Labels do not depend on the query direction: a tail query (h, r, ?) and the reciprocal head query (t, r + R, ?) need
the same two entity representations. ``direction`` arguments still exist so callers can index reciprocal query arrays
(``"both"`` = tail rows then head rows, the order of :meth:`KGDataset.queries`).
:meth:`SyntheticTruth.target_action` encodes the helpful subset as a policy action (bitmask over ``teachers`` − 1,
bit i = teacher i, as in SPEC §5.3), −1 where no teacher is helpful.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dsom.data.graph import SPLITS, KGDataset, Vocabulary
from dsom.data.modality import IMPUTATIONS, ModalityTable
from dsom.errors import ConfigError

STRUCTURE = "structure"
HELPFUL, UNINFORMATIVE, MISLEADING = 1, 0, -1
DEFAULT_FEATURE_DIMS = {"text": 64, "image": 48, "numeric": 24}
FALLBACK_FEATURE_DIM = 32
DIRECTIONS = ("tail", "head", "both")

SYNTHETIC_DEFAULTS: dict[str, Any] = {
    "num_entities": 3000,
    "num_relations": 24,
    "num_train": 40000,
    "num_valid": 2000,
    "num_test": 2000,
    "modalities": ("text", "numeric", "image"),
    "seed": 0,
    "block_rank": 4,          # complex dimension k of every latent block
    "num_clusters": 12,       # clusters per latent block
    "cluster_strength": 0.8,  # share of latent variance explained by the cluster centre
    "sharpness": 6.0,         # tail logits = sharpness * unit-variance score
    "activity_sigma": 1.5,    # entity activity is log-normal: a_e = exp(activity_sigma * N(0, 1))
    "popularity": 1.0,        # weight of log-activity in tail logits (preferential attachment)
    "feature_dims": None,     # None (per-name defaults), an int, or {modality: dim}
    "feature_noise": 0.2,     # std of additive feature noise (signal columns have unit variance)
    "nuisance_dims": 8,       # uninformative entity-specific factors mixed into every modality
    "corrupt_frac": 0.15,     # float or {modality: float}
    "missing_frac": 0.10,     # float or {modality: float}
    "unseen_frac": 0.01,      # entities held out of train (valid/test only)
    "min_degree": 10,         # structure-helpful threshold on (leave-one-out) train support
    "imputation": "normal",   # how missing rows are filled (ModalityTable.from_partial)
}


@dataclass
class SyntheticTruth:
    """Planted ground truth of a synthetic dataset (``ds.extras["synthetic"]``); see the module docstring.

    Attributes:
        teachers: teacher pool, ``("structure", *modalities)``; the column order of every label array.
        blocks: latent block names (``blocks[i]`` is revealed by ``teachers[i]``; structure by the graph only).
        latent: ``(E, B, 2k)`` float32, ``[Re u, Im u]`` of each entity's complex factor per block.
        clusters: ``(E, B)`` int64 cluster of each entity in each block (``[:, 0]`` is the entity type).
        relation_blocks: ``(R, B)`` bool, blocks each relation depends on.
        relation_factors: ``(R, B, k)`` complex64 diagonal relation factors (zero on unused blocks); with
            ``latent`` they give the exact generating scores (see :meth:`scores`; tail logits are
            ``params["sharpness"]·scores + params["popularity"]·log(activity)``).
        activity: ``(E,)`` float64 log-normal entity activity (head sampling weight; tail prior ``popularity·log a``).
        corrupted / missing: ``{modality: (E,) bool}`` entity masks (disjoint per modality).
        corruption_source: ``{modality: (E,) int64}`` entity whose clean features a corrupted row holds, −1 if clean.
        clean_features: ``{modality: (E, F) float32}`` features before corruption and imputation.
        train_degree: ``(E,)`` int64 number of train triples containing each entity.
        unseen: ``(E,)`` bool, entities of valid/test without any train triple.
        min_degree: structure-helpful threshold on leave-one-out train support.
        num_relations: R (reciprocal relation ids ``r + R`` are accepted by :meth:`label_triples`).
        labels: ``{split: (n, T) int8}`` labels of the split's triples (row i = triple i).
        params: the full parameter set the dataset was generated with (JSON-serialisable).
        train_keys: sorted ``(h·R + r)·E + t`` keys of the train triples (used by :meth:`label_triples`).
    """

    teachers: tuple[str, ...]
    blocks: tuple[str, ...]
    latent: np.ndarray
    clusters: np.ndarray
    relation_blocks: np.ndarray
    relation_factors: np.ndarray
    activity: np.ndarray
    corrupted: dict[str, np.ndarray]
    missing: dict[str, np.ndarray]
    corruption_source: dict[str, np.ndarray]
    clean_features: dict[str, np.ndarray]
    train_degree: np.ndarray
    unseen: np.ndarray
    min_degree: int
    num_relations: int
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    train_keys: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64), repr=False)

    @property
    def num_entities(self) -> int:
        return int(self.latent.shape[0])

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.teachers[1:]

    def _key(self, h: np.ndarray, r: np.ndarray, t: np.ndarray) -> np.ndarray:
        # the product key of dsom.data.graph.triple_keys (keys must stay comparable between calls here, so no
        # dense fallback: generation refuses sizes where it could overflow)
        return (h * self.num_relations + r) * self.num_entities + t

    def label_triples(self, triples: np.ndarray) -> np.ndarray:
        """Labels ``(n, T)`` int8 of arbitrary ``(h, r, t)`` rows; reciprocal rows ``(t, r + R, h)`` are accepted
        and labelled as their original triple. Train membership (for leave-one-out support) is looked up."""
        x = np.asarray(triples, dtype=np.int64).reshape(-1, 3)
        R = self.num_relations
        inv = x[:, 1] >= R
        h = np.where(inv, x[:, 2], x[:, 0])
        r = np.where(inv, x[:, 1] - R, x[:, 1])
        t = np.where(inv, x[:, 0], x[:, 2])
        if len(self.train_keys):
            key = self._key(h, r, t)
            pos = np.clip(np.searchsorted(self.train_keys, key), 0, len(self.train_keys) - 1)
            in_train = self.train_keys[pos] == key
        else:
            in_train = np.zeros(len(x), dtype=bool)
        return self._labels(h, r, t, in_train)

    def _labels(self, h: np.ndarray, r: np.ndarray, t: np.ndarray, in_train: np.ndarray) -> np.ndarray:
        lab = np.zeros((len(h), len(self.teachers)), dtype=np.int8)
        loo = in_train.astype(np.int64)
        support = np.minimum(self.train_degree[h] - loo, self.train_degree[t] - loo)
        lab[:, 0] = np.where(support >= self.min_degree, HELPFUL, UNINFORMATIVE)
        for i, m in enumerate(self.modalities, start=1):
            dep = self.relation_blocks[r, i]
            bad = self.corrupted[m][h] | self.corrupted[m][t]
            gone = self.missing[m][h] | self.missing[m][t]
            lab[:, i] = np.where(dep, np.where(bad, MISLEADING, np.where(gone, UNINFORMATIVE, HELPFUL)),
                                 UNINFORMATIVE)
        return lab

    def labels_for(self, split: str, direction: str = "tail") -> np.ndarray:
        """Labels of a split: ``(n, T)`` for ``"tail"`` or ``"head"``, ``(2n, T)`` for ``"both"`` (tail rows then
        head rows, matching :meth:`KGDataset.queries`)."""
        if split not in self.labels:
            raise KeyError(f"unknown split '{split}'; choose one of {tuple(self.labels)}")
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction '{direction}'; choose one of {DIRECTIONS}")
        lab = self.labels[split]
        return np.concatenate([lab, lab], axis=0) if direction == "both" else lab

    def helpful_subset(self, split: str, direction: str = "tail") -> np.ndarray:
        """``(n, T)`` bool (``(2n, T)`` for ``"both"``): teachers labelled helpful (+1)."""
        return self.labels_for(split, direction) == HELPFUL

    def misleading_subset(self, split: str, direction: str = "tail") -> np.ndarray:
        """``(n, T)`` bool (``(2n, T)`` for ``"both"``): teachers labelled misleading (−1)."""
        return self.labels_for(split, direction) == MISLEADING

    def target_action(self, split: str, direction: str = "tail") -> np.ndarray:
        """Policy action of the helpful subset (bitmask over ``teachers`` minus 1; −1 where none is helpful)."""
        return subset_to_action(self.helpful_subset(split, direction))

    def scores(self, relation: int, heads: np.ndarray) -> np.ndarray:
        """Generating scores ``s_r(h, ·)`` (unit variance, before ``sharpness``) of ``heads`` against all entities."""
        return _relation_scores(self.latent, self.relation_factors[relation], np.asarray(heads, dtype=np.int64))


def subset_to_action(mask: np.ndarray) -> np.ndarray:
    """``(..., T)`` bool teacher subsets -> action index ``Σ_i mask_i·2^i − 1`` (−1 for the empty subset)."""
    m = np.asarray(mask, dtype=bool)
    weights = (1 << np.arange(m.shape[-1])).astype(np.int64)
    return (m.astype(np.int64) * weights).sum(axis=-1) - 1


# ---------------------------------------------------------------------------------------------------------------
# generation


def _split_complex(z: np.ndarray) -> np.ndarray:
    k = z.shape[-1] // 2
    return z[..., :k] + 1j * z[..., k:]


def _relation_scores(latent: np.ndarray, factors: np.ndarray, heads: np.ndarray,
                     bias: np.ndarray | None = None) -> np.ndarray:
    """``Σ_b Re⟨u[h, b], w[b], conj(u[t, b])⟩ (+ bias[t])`` for ``heads`` x all entities, one float32 product."""
    k = factors.shape[-1]
    re, im = latent[..., :k].astype(np.float32), latent[..., k:].astype(np.float32)
    wr, wi = factors.real.astype(np.float32), factors.imag.astype(np.float32)
    qre = re[heads] * wr - im[heads] * wi                    # Re(u_h w), (H, B, k)
    qim = re[heads] * wi + im[heads] * wr                    # Im(u_h w)
    q = np.concatenate([qre, qim], axis=-1).reshape(len(heads), -1)
    z = np.concatenate([re, im], axis=-1).reshape(latent.shape[0], -1)
    if bias is not None:
        q = np.concatenate([q, np.ones((len(heads), 1), np.float32)], axis=1)
        z = np.concatenate([z, np.asarray(bias, np.float32).reshape(-1, 1)], axis=1)
    return q @ z.T


def _relation_patterns(num_blocks: int) -> list[tuple[int, ...]]:
    singles = [(b,) for b in range(num_blocks)]
    pairs = list(itertools.combinations(range(num_blocks), 2))
    return singles + pairs


def _per_modality(value: Any, modalities: Sequence[str], name: str, defaults: Mapping[str, Any] | None,
                  fallback: Any) -> dict[str, Any]:
    """Expand a scalar or a partial ``{modality: value}`` mapping to one value per modality."""
    base = {m: (defaults or {}).get(m, fallback) for m in modalities}
    if value is None:
        return base
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(modalities))
        if unknown:
            raise ConfigError(f"synthetic option '{name}' names unknown modalities {unknown}; "
                              f"modalities are {list(modalities)}")
        base.update(value)
        return base
    return dict.fromkeys(modalities, value)


def _inverse_cdf(cdf: np.ndarray, rows: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Row-wise ``searchsorted``: for rows ``rows`` ``(n,)`` of ``cdf`` (non-decreasing rows of length E) and ``u``
    ``(n, s)`` in ``(0, cdf[rows, -1]]``, the first column j with ``cdf[rows[i], j] >= u[i, ·]`` (vectorised
    binary search)."""
    e = cdf.shape[1]
    lo = np.zeros(u.shape, dtype=np.int64)
    hi = np.full(u.shape, e - 1, dtype=np.int64)
    rows = np.asarray(rows)[:, None]
    for _ in range(max(1, int(e - 1).bit_length())):
        mid = (lo + hi) // 2
        go = cdf[rows, mid] < u
        lo = np.where(go, mid + 1, lo)
        hi = np.where(go, hi, mid)
    return lo


def _gumbel_top_k(logits: np.ndarray, k: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Row i draws ``k[i]`` distinct columns without replacement from ``softmax(logits[i])`` (Gumbel top-K);
    returns ``(row, column)`` with each row's columns in draw order."""
    kmax = int(k.max())
    noise = np.maximum(rng.standard_exponential(logits.shape, dtype=np.float32), np.float32(1e-30))
    g = logits - np.log(noise)
    part = np.argpartition(-g, kmax - 1, axis=1)[:, :kmax]
    order = np.argsort(-np.take_along_axis(g, part, axis=1), axis=1, kind="stable")
    part = np.take_along_axis(part, order, axis=1)
    return np.repeat(np.arange(len(k)), k), part[np.arange(kmax)[None, :] < k[:, None]]


def _sample_tails(logits: np.ndarray, counts: np.ndarray, rng: np.random.Generator,
                  gumbel_above: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Row i draws ``counts[i]`` distinct columns from ``softmax(logits[i])`` without replacement.

    Returns ``(row, column)`` index arrays, the columns of a row in draw order. Rows with more than
    ``gumbel_above`` draws use Gumbel top-K. The others use successive sampling, which is cheaper: a batch of
    i.i.d. inverse-CDF draws whose first ``counts[i]`` distinct columns, in order of appearance, are the sample;
    a row that finds fewer continues, exactly, with Gumbel top-K over the columns not found yet. Both are exact
    sampling without replacement. ``logits`` is overwritten.
    """
    rows_out, cols_out = [], []
    big = np.flatnonzero(counts > gumbel_above)
    if len(big):
        row, col = _gumbel_top_k(logits[big], counts[big], rng)
        rows_out.append(big[row])
        cols_out.append(col)
    small = np.flatnonzero(counts <= gumbel_above)
    if len(small):
        n_cols = logits.shape[1]
        need = counts[small]
        cdf = logits[small]
        cdf -= cdf.max(axis=1, keepdims=True)
        np.exp(cdf, out=cdf)
        np.cumsum(cdf, axis=1, out=cdf)
        width = 3 * int(need.max()) + 4
        u = (1.0 - rng.random((len(small), width), dtype=np.float32)) * cdf[:, -1:]
        draws = _inverse_cdf(cdf, np.arange(len(small)), u)
        _, first = np.unique((np.arange(len(small))[:, None] * n_cols + draws).ravel(), return_index=True)
        first.sort()                                     # by row, then by draw position
        row = first // width
        rank = np.arange(len(first)) - np.searchsorted(row, row)
        keep = rank < need[row]
        rows_out.append(small[row[keep]])
        cols_out.append(draws.ravel()[first[keep]])
        found = np.bincount(row[keep], minlength=len(small))
        short = np.flatnonzero(found < need)
        if len(short):                                   # continue without replacement over what is left
            prob = np.diff(cdf[short], axis=1, prepend=0.0)
            sel = np.isin(row[keep], short)
            prob[np.searchsorted(short, row[keep][sel]), draws.ravel()[first[keep]][sel]] = 0.0
            with np.errstate(divide="ignore"):
                rest_row, rest_col = _gumbel_top_k(np.log(prob), need[short] - found[short], rng)
            rows_out.append(small[short[rest_row]])
            cols_out.append(rest_col)
    rows, cols = np.concatenate(rows_out), np.concatenate(cols_out)
    order = np.argsort(rows, kind="stable")              # group rows; draw order within a row is kept
    return rows[order], cols[order]


def _validate(p: dict[str, Any]) -> None:
    def need(cond: bool, key: str, what: str) -> None:
        if not cond:
            raise ConfigError(f"synthetic option '{key}' = {p[key]!r}: {what}")

    need(p["seed"] >= 0, "seed", "must be >= 0")
    need(p["num_entities"] >= 10, "num_entities", "need at least 10 entities")
    need(p["num_relations"] >= 1, "num_relations", "need at least 1 relation")
    need(p["num_entities"] ** 2 * p["num_relations"] < 2**62, "num_entities",
         "too large: entities^2 x relations must stay below 2^62 (int64 triple keys)")
    need(p["num_train"] >= 1, "num_train", "need at least 1 train triple")
    need(p["num_valid"] >= 0, "num_valid", "must be >= 0")
    need(p["num_test"] >= 0, "num_test", "must be >= 0")
    need(p["block_rank"] >= 1, "block_rank", "must be >= 1")
    need(p["num_clusters"] >= 1, "num_clusters", "must be >= 1")
    need(0.0 <= p["cluster_strength"] <= 1.0, "cluster_strength", "must be in [0, 1]")
    need(p["sharpness"] > 0, "sharpness", "must be > 0")
    need(p["activity_sigma"] >= 0, "activity_sigma", "must be >= 0")
    need(p["popularity"] >= 0, "popularity", "must be >= 0")
    need(p["feature_noise"] >= 0, "feature_noise", "must be >= 0")
    need(p["nuisance_dims"] >= 0, "nuisance_dims", "must be >= 0")
    need(0.0 <= p["unseen_frac"] < 1.0, "unseen_frac", "must be in [0, 1)")
    need(p["min_degree"] >= 0, "min_degree", "must be >= 0")
    need(p["imputation"] in IMPUTATIONS, "imputation", f"choose one of {IMPUTATIONS}")
    mods = p["modalities"]
    need(len(set(mods)) == len(mods), "modalities", "names must be unique")
    need(all(isinstance(m, str) and m and m != STRUCTURE for m in mods), "modalities",
         f"names must be non-empty strings other than '{STRUCTURE}'")
    E, R = p["num_entities"], p["num_relations"]
    total = p["num_train"] + p["num_valid"] + p["num_test"]
    need(total <= R * E * (E - 1) // 4, "num_train", f"{total} triples do not fit {E} entities and {R} relations")
    for m, d in p["feature_dims"].items():
        if not (isinstance(d, (int, np.integer)) and d >= 1):
            raise ConfigError(f"synthetic option 'feature_dims': dimension of '{m}' must be a positive integer, got {d!r}")
    for m in mods:
        c, q = p["corrupt_frac"][m], p["missing_frac"][m]
        if not (0.0 <= c and 0.0 <= q and c + q <= 1.0):
            raise ConfigError(f"synthetic options 'corrupt_frac'/'missing_frac' for '{m}' = {c!r}/{q!r}: "
                              "each must be >= 0 and their sum <= 1")


def generate_synthetic(num_entities: int = 3000, num_relations: int = 24, num_train: int = 40000,
                       num_valid: int = 2000, num_test: int = 2000,
                       modalities: Sequence[str] = ("text", "numeric", "image"), seed: int = 0, *,
                       block_rank: int = 4, num_clusters: int = 12, cluster_strength: float = 0.8,
                       sharpness: float = 6.0, activity_sigma: float = 1.5, popularity: float = 1.0,
                       feature_dims: int | Mapping[str, int] | None = None, feature_noise: float = 0.2,
                       nuisance_dims: int = 8, corrupt_frac: float | Mapping[str, float] = 0.15,
                       missing_frac: float | Mapping[str, float] = 0.10, unseen_frac: float = 0.01,
                       min_degree: int = 10, imputation: str = "normal") -> KGDataset:
    """Generate the seeded synthetic multimodal KG described in the module docstring.

    Deterministic for a given parameter set. Returns a ``KGDataset`` named ``"synthetic"`` (layout
    ``"synthetic"``, no root) with ``modalities`` as ``ModalityTable`` s and the :class:`SyntheticTruth` in
    ``extras["synthetic"]``. Invalid parameters raise :class:`~dsom.errors.ConfigError`.
    """
    modalities = tuple(modalities)
    p: dict[str, Any] = {
        "num_entities": int(num_entities), "num_relations": int(num_relations), "num_train": int(num_train),
        "num_valid": int(num_valid), "num_test": int(num_test), "modalities": modalities, "seed": int(seed),
        "block_rank": int(block_rank), "num_clusters": int(num_clusters),
        "cluster_strength": float(cluster_strength), "sharpness": float(sharpness), "activity_sigma": float(activity_sigma),
        "popularity": float(popularity),
        "feature_dims": _per_modality(feature_dims, modalities, "feature_dims", DEFAULT_FEATURE_DIMS,
                                      FALLBACK_FEATURE_DIM),
        "feature_noise": float(feature_noise), "nuisance_dims": int(nuisance_dims),
        "corrupt_frac": {m: float(v) for m, v in _per_modality(
            corrupt_frac, modalities, "corrupt_frac", None, SYNTHETIC_DEFAULTS["corrupt_frac"]).items()},
        "missing_frac": {m: float(v) for m, v in _per_modality(
            missing_frac, modalities, "missing_frac", None, SYNTHETIC_DEFAULTS["missing_frac"]).items()},
        "unseen_frac": float(unseen_frac), "min_degree": int(min_degree), "imputation": str(imputation),
    }
    _validate(p)
    blocks = (STRUCTURE, *modalities)
    ss_latent, ss_rel, ss_triples, ss_split, ss_feat = np.random.SeedSequence(p["seed"]).spawn(5)
    latent, clusters = _latent_factors(p, len(blocks), ss_latent)
    relation_blocks, factors = _relations(p, latent, ss_rel)
    triples, activity = _triples(p, latent, factors, ss_triples)
    splits = _split(p, triples, ss_split)
    E, R = p["num_entities"], p["num_relations"]
    train = splits["train"]
    train_degree = np.bincount(train[:, 0], minlength=E) + np.bincount(train[:, 2], minlength=E)
    in_eval = np.zeros(E, dtype=bool)
    for s in ("valid", "test"):
        in_eval[splits[s][:, 0]] = True
        in_eval[splits[s][:, 2]] = True
    unseen = in_eval & (train_degree == 0)
    tables, features = _features(p, latent, ss_feat)

    truth = SyntheticTruth(
        teachers=blocks, blocks=blocks, latent=latent, clusters=clusters.astype(np.int64),
        relation_blocks=relation_blocks, relation_factors=factors.astype(np.complex64), activity=activity,
        corrupted=features["corrupted"], missing=features["missing"], corruption_source=features["source"],
        clean_features=features["clean"], train_degree=train_degree.astype(np.int64), unseen=unseen,
        min_degree=p["min_degree"], num_relations=R, params={**p, "modalities": list(modalities)},
    )
    truth.train_keys = np.sort(truth._key(train[:, 0], train[:, 1], train[:, 2]))
    for s in SPLITS:
        x = splits[s]
        truth.labels[s] = truth._labels(x[:, 0], x[:, 1], x[:, 2], np.full(len(x), s == "train"))
    entities, relations = _vocabularies(E, blocks, relation_blocks)
    return KGDataset(name="synthetic", entities=entities, relations=relations, splits=splits, root=None,
                     layout="synthetic", modalities=tables, extras={"synthetic": truth})


def _latent_factors(p: dict[str, Any], num_blocks: int, seed: np.random.SeedSequence) -> tuple[np.ndarray, np.ndarray]:
    """Independent clustered complex factors per block: ``latent (E, B, 2k)`` float32 and ``clusters (E, B)``."""
    rng = np.random.default_rng(seed)
    E, B, k = p["num_entities"], num_blocks, p["block_rank"]
    clusters = rng.integers(0, p["num_clusters"], size=(E, B))
    centres = rng.standard_normal((B, p["num_clusters"], 2 * k))
    rho = p["cluster_strength"]
    latent = (math.sqrt(rho) * centres[np.arange(B)[None, :], clusters]
              + math.sqrt(1.0 - rho) * rng.standard_normal((E, B, 2 * k))).astype(np.float32)
    return latent, clusters


def _relations(p: dict[str, Any], latent: np.ndarray, seed: np.random.SeedSequence) -> tuple[np.ndarray, np.ndarray]:
    """Block patterns ``(R, B)`` bool and complex diagonal factors ``(R, B, k)`` scaled to unit-variance scores."""
    rng = np.random.default_rng(seed)
    E, R, k, B = p["num_entities"], p["num_relations"], p["block_rank"], latent.shape[1]
    patterns = _relation_patterns(B)
    relation_blocks = np.zeros((R, B), dtype=bool)
    factors = np.zeros((R, B, k), dtype=np.complex128)
    probe_h = rng.integers(0, E, size=4096)
    probe_t = rng.integers(0, E, size=4096)
    u = _split_complex(latent.astype(np.float64))
    for r in range(R):
        used = patterns[r % len(patterns)]
        relation_blocks[r, list(used)] = True
        for b in used:
            w = rng.uniform(0.5, 1.5, size=k) * np.exp(1j * rng.uniform(0.0, 2 * np.pi, size=k))
            s = np.real((u[probe_h, b] * w * np.conj(u[probe_t, b])).sum(axis=1))
            factors[r, b] = w / (s.std() * math.sqrt(len(used)))
    return relation_blocks, factors


def _head_counts(p_head: np.ndarray, guaranteed: np.ndarray, extra: int, rng: np.random.Generator) -> np.ndarray:
    """Triples per head of one relation: the guaranteed heads plus ``extra`` drawn from ``p_head``, each head
    capped at ``E - 1`` distinct tails (the excess spilled onto heads with room)."""
    E = len(p_head)
    counts = np.bincount(guaranteed, minlength=E)
    counts += rng.multinomial(extra, p_head / p_head.sum())
    over = counts > E - 1
    while over.any():
        spill = int((counts[over] - (E - 1)).sum())
        counts[over] = E - 1
        room = np.flatnonzero(counts < E - 1)
        counts += np.bincount(rng.choice(room, size=spill), minlength=E)
        over = counts > E - 1
    return counts


def _triples(p: dict[str, Any], latent: np.ndarray, factors: np.ndarray,
             seed: np.random.SeedSequence) -> tuple[np.ndarray, np.ndarray]:
    """All triples ``(N, 3)`` in random order, and the entities' activity ``(E,)``: log-normal activity for heads
    (and as a tail prior), distinct tails per head drawn from the relation's softmax."""
    rng = np.random.default_rng(seed)
    E, R = p["num_entities"], p["num_relations"]
    total = p["num_train"] + p["num_valid"] + p["num_test"]
    activity = np.exp(p["activity_sigma"] * rng.standard_normal(E))
    log_pop = (p["popularity"] * np.log(activity)).astype(np.float32)
    rel_weight = 0.5 / R + 0.5 * rng.dirichlet(np.full(R, 2.0))
    rel_weight /= rel_weight.sum()
    n_guar = min(E, total)                           # every entity heads at least one triple (if N >= E)
    guar_ent = rng.permutation(E)[:n_guar]
    guar_rel = rng.choice(R, size=n_guar, p=rel_weight)
    rel_extra = rng.multinomial(total - n_guar, rel_weight)
    parts = []
    for r in range(R):
        p_head = activity * np.exp(0.5 * rng.standard_normal(E))
        counts = _head_counts(p_head, guar_ent[guar_rel == r], int(rel_extra[r]), rng)
        if counts.sum() == 0:
            continue
        heads = np.flatnonzero(counts)
        logits = _relation_scores(latent, p["sharpness"] * factors[r], heads, bias=log_pop)
        logits[np.arange(len(heads)), heads] = -np.inf
        row, tail = _sample_tails(logits, counts[heads], rng)
        parts.append(np.stack([heads[row], np.full(len(row), r), tail], axis=1))
    triples = np.concatenate(parts, axis=0).astype(np.int64)
    return triples[rng.permutation(len(triples))], activity


def _split(p: dict[str, Any], triples: np.ndarray, seed: np.random.SeedSequence) -> dict[str, np.ndarray]:
    """Train/valid/test: hold out a few low-degree entities (unseen in train), keep every other entity in train,
    fill valid and test at random."""
    rng = np.random.default_rng(seed)
    E, n_valid, n_test = p["num_entities"], p["num_valid"], p["num_test"]
    degree = np.bincount(triples[:, 0], minlength=E) + np.bincount(triples[:, 2], minlength=E)
    candidates = np.flatnonzero((degree >= 1) & (degree <= 3))
    n_unseen = min(int(round(p["unseen_frac"] * E)), len(candidates)) if n_valid + n_test > 0 else 0
    held_out = rng.choice(candidates, size=n_unseen, replace=False) if n_unseen else np.empty(0, np.int64)
    while True:
        is_held = np.zeros(E, dtype=bool)
        is_held[held_out] = True
        forced = is_held[triples[:, 0]] | is_held[triples[:, 2]]
        if forced.sum() <= n_valid + n_test:
            break
        held_out = held_out[:-1]
    free = np.flatnonzero(~forced)
    perm = free[rng.permutation(len(free))]
    ends = np.concatenate([triples[perm, 0], triples[perm, 2]])
    _, first = np.unique(ends, return_index=True)
    reserved = np.zeros(len(triples), dtype=bool)
    reserved[np.concatenate([perm, perm])[first]] = True
    pool = np.flatnonzero(~forced & ~reserved)
    fill = n_valid + n_test - int(forced.sum())
    if fill > len(pool):                             # tiny configurations: give up full train coverage
        pool = np.flatnonzero(~forced)
    chosen = np.concatenate([np.flatnonzero(forced), rng.choice(pool, size=fill, replace=False)])
    chosen = chosen[rng.permutation(len(chosen))]
    in_heldout = np.zeros(len(triples), dtype=bool)
    in_heldout[chosen] = True
    return {"train": triples[~in_heldout], "valid": triples[chosen[:n_valid]], "test": triples[chosen[n_valid:]]}


def _features(p: dict[str, Any], latent: np.ndarray,
              seed: np.random.SeedSequence) -> tuple[dict[str, ModalityTable], dict[str, dict[str, np.ndarray]]]:
    """One feature table per modality revealing its own block (block ``i`` for the ``i``-th modality), with
    corrupted entities (showing another entity's features) and missing ones; and, by kind (``corrupted``,
    ``missing``, ``source``, ``clean``) and modality, what was planted."""
    E, modalities = p["num_entities"], p["modalities"]
    tables: dict[str, ModalityTable] = {}
    planted: dict[str, dict[str, np.ndarray]] = {"corrupted": {}, "missing": {}, "source": {}, "clean": {}}
    for i, (m, ss_m) in enumerate(zip(modalities, seed.spawn(len(modalities))), start=1):
        rng = np.random.default_rng(ss_m)
        dim = int(p["feature_dims"][m])
        src = np.concatenate([latent[:, i].astype(np.float64), rng.standard_normal((E, p["nuisance_dims"]))],
                             axis=1)
        mix = rng.standard_normal((src.shape[1], dim)) / math.sqrt(src.shape[1])
        x = src @ mix + p["feature_noise"] * rng.standard_normal((E, dim))
        x = (x - x.mean(axis=0)) / np.maximum(x.std(axis=0), 1e-8)
        order = rng.permutation(E)
        n_bad = int(round(p["corrupt_frac"][m] * E))
        n_gone = min(int(round(p["missing_frac"][m] * E)), E - n_bad)
        bad = np.zeros(E, dtype=bool)
        bad[order[:n_bad]] = True
        gone = np.zeros(E, dtype=bool)
        gone[order[n_bad:n_bad + n_gone]] = True
        source = np.full(E, -1, dtype=np.int64)
        idx = np.flatnonzero(bad)
        other = rng.integers(0, E - 1, size=len(idx))
        source[idx] = other + (other >= idx)         # a uniformly random *other* entity
        shown = x.copy()
        shown[idx] = x[source[idx]]
        tables[m] = ModalityTable.from_partial(
            m, shown, ~gone, imputation=p["imputation"], seed=int(rng.integers(2**31)),
            source=f"synthetic(seed={p['seed']}, block={m}, corrupt={n_bad}, missing={n_gone})")
        for kind, value in (("corrupted", bad), ("missing", gone), ("source", source), ("clean", x.astype(np.float32))):
            planted[kind][m] = value
    return tables, planted


def _vocabularies(E: int, blocks: Sequence[str], relation_blocks: np.ndarray) -> tuple[Vocabulary, Vocabulary]:
    """Entity and relation labels, names and descriptions (a relation's name lists the blocks it depends on)."""
    R = len(relation_blocks)
    ew = max(4, len(str(E - 1)))
    rw = max(2, len(str(R - 1)))
    entities = Vocabulary(
        labels=[f"e{i:0{ew}d}" for i in range(E)],
        names=[f"entity {i}" for i in range(E)],
        # deliberately carries no latent information: a text encoder run on it must not leak planted factors
        descriptions=[f"synthetic entity number {i}" for i in range(E)],
    )
    uses = [", ".join(blocks[b] for b in np.flatnonzero(relation_blocks[r])) for r in range(R)]
    relations = Vocabulary(
        labels=[f"r{r:0{rw}d}" for r in range(R)],
        names=[f"relation {r} ({u.replace(', ', '+')})" for r, u in enumerate(uses)],
        descriptions=[f"synthetic relation depending on the {u} factors" for u in uses],
    )
    return entities, relations


# ---------------------------------------------------------------------------------------------------------------
# options (the ``synthetic`` dataset's configuration block / ``--set`` overrides)


def _as_int(key: str, v: Any) -> int:
    if isinstance(v, bool):
        raise ConfigError(f"synthetic option '{key}' must be an integer, got {v!r}")
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            pass
    raise ConfigError(f"synthetic option '{key}' must be an integer, got {v!r}")


def _as_float(key: str, v: Any) -> float:
    if isinstance(v, bool):
        raise ConfigError(f"synthetic option '{key}' must be a number, got {v!r}")
    try:
        out = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"synthetic option '{key}' must be a number, got {v!r}") from None
    if not math.isfinite(out):
        raise ConfigError(f"synthetic option '{key}' must be finite, got {v!r}")
    return out


def _as_modalities(key: str, v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        items = [s.strip() for s in v.split(",") if s.strip()]
    elif isinstance(v, Sequence):
        items = list(v)
    else:
        raise ConfigError(f"synthetic option '{key}' must be a list of names or a comma-separated string, got {v!r}")
    if not all(isinstance(s, str) for s in items):
        raise ConfigError(f"synthetic option '{key}' must contain names (strings), got {v!r}")
    return tuple(items)


def _as_per_modality(key: str, v: Any, conv: Any) -> Any:
    if v is None and key == "feature_dims":
        return None
    if isinstance(v, Mapping):
        return {str(m): conv(f"{key}.{m}", x) for m, x in v.items()}
    return conv(key, v)


_COERCE: dict[str, Any] = {
    "modalities": _as_modalities,
    "imputation": lambda key, v: str(v),
    "feature_dims": lambda key, v: _as_per_modality(key, v, _as_int),
    "corrupt_frac": lambda key, v: _as_per_modality(key, v, _as_float),
    "missing_frac": lambda key, v: _as_per_modality(key, v, _as_float),
}
for _key, _default in SYNTHETIC_DEFAULTS.items():
    if _key not in _COERCE:
        _COERCE[_key] = _as_int if isinstance(_default, int) else _as_float


def resolve_synthetic_options(options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:data:`SYNTHETIC_DEFAULTS` updated by ``options`` (values coerced; strings such as ``"0.2"`` accepted).

    Raises :class:`~dsom.errors.ConfigError` for an unknown key (listing the valid ones) or a value of the wrong type.
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(SYNTHETIC_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown synthetic option{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(repr(u) for u in unknown)}; valid keys: {', '.join(SYNTHETIC_DEFAULTS)}")
    out = dict(SYNTHETIC_DEFAULTS)
    for key, value in options.items():
        out[key] = _COERCE[key](key, value)
    return out


def synthetic_from_options(options: Mapping[str, Any] | None = None) -> KGDataset:
    """Generate the synthetic dataset with :data:`SYNTHETIC_DEFAULTS` overridden by ``options``."""
    return generate_synthetic(**resolve_synthetic_options(options))
