"""Contrastive losses for dual encoders: pure functions from embeddings to a float32 scalar.

Every function takes raw embeddings [B, D] of any float dtype, L2-normalises them in float32
and compares them by cosine similarity:

    s(x, y) = <x / |x|, y / |y|>,        logit = s / t        (t: temperature)

q_i and p_i are the query and the passage of example i of the batch B, and n_m are the hard
negatives. Each contrastive loss is the batch mean of a per-example -log softmax, and a
bidirectional loss is the mean of its two directions (CoSENT is one log-sum-exp over pairs).
Log-sum-exps go through `jax.nn.logsumexp`, and a dropped term becomes a -inf logit. The
positive is always in its own denominator, so every row stays finite, even at t = 0.01 with
cosine 1.0 and with all of a row's negatives dropped.

  samtone_loss           SamToNe (Moiseev et al. 2023): in-batch softmax + same-tower negatives
  in_batch_softmax_loss  in-batch sampled softmax (Henderson et al. 2017)
  pair_loss              PAIR (Ren et al. 2021): query- plus passage-centric terms
  cosent_loss            CoSENT (Su 2022): ranking of pair cosines by graded labels
  in_batch_accuracy      a metric for training logs: top-1 in-batch retrieval accuracy
"""
from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp

from samtone.errors import ConfigError
from samtone.normalize import l2_normalize

Array = jax.Array

HARDNESS_TARGETS = ("hard", "in_batch", "all")


def _similarities(a: Array, b: Array) -> Array:
    """[A, D] x [C, D] -> [A, C] dot products of the rows, in full float32.

    Every caller passes L2-normalised rows, so these dot products are the cosine similarities.
    """
    return jnp.einsum("id,jd->ij", a, b, precision=jax.lax.Precision.HIGHEST)


# ---------------------------------------------------------------------------------------------
# Softmax building blocks.


def _softmax_losses(positive_logits: Array, negative_logits: list[Array]) -> Array:
    """Per-row -log(e^pos / (e^pos + sum_c e^neg_c)) = logsumexp([pos, neg...]) - pos, [B]."""
    logits = jnp.concatenate([positive_logits[:, None], *negative_logits], axis=1)
    return jax.nn.logsumexp(logits, axis=1) - positive_logits


def _negative_logits(cosine: Array, temperature, *, dropped: Array | None = None,
                     bonus=0.0, exclude_diagonal: bool = True) -> Array:
    """s/t + bonus * stop_gradient(s) per denominator term; -inf where a term is dropped.

    `exclude_diagonal` drops [i, i]: in-batch matrices hold the positive (or the row's own
    text) there, which is not a negative.
    """
    keep = jnp.ones(cosine.shape, bool)
    if exclude_diagonal:
        keep = ~jnp.eye(*cosine.shape, dtype=bool)
    if dropped is not None:
        keep = keep & ~dropped
    logits = cosine / temperature + bonus * jax.lax.stop_gradient(cosine)
    return jnp.where(keep, logits, -jnp.inf)


# ---------------------------------------------------------------------------------------------
# Composable pieces around the formula: which terms are known positives (id masking), and
# which get a hardness bonus.


def _same_id(ids_a: Array, ids_b: Array) -> Array:
    return ids_a[:, None] == ids_b[None, :]


def _any_path(a: Array, b: Array) -> Array:
    """Boolean matrix product: [i, j] = any_k a[i, k] and b[k, j]."""
    return jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32)) > 0.5


@dataclasses.dataclass(frozen=True)
class _KnownPositives:
    """Denominator terms that are labelled pairs of the batch, hence dropped (None: none).

    R[i, j] = "some example pairs q_i's id with p_j's id" = S_q S_p, with S the same-id
    matrices. Every mask below derives from R (see samtone_loss's docstring).
    """

    pairs: Array | None  # [B, B]: R
    hard: Array | None  # [B, B*K]: n_m is a passage labelled for q_i

    @classmethod
    def from_ids(cls, query_ids, passage_ids, negative_ids, batch_size: int) -> _KnownPositives:
        if query_ids is None and passage_ids is None:
            return cls(None, None)
        eye = jnp.eye(batch_size, dtype=bool)
        same_query = eye if query_ids is None else _same_id(query_ids, query_ids)
        same_passage = eye if passage_ids is None else _same_id(passage_ids, passage_ids)
        hard = (None if negative_ids is None
                else _any_path(same_query, _same_id(passage_ids, negative_ids)))
        return cls(_any_path(same_query, same_passage), hard)

    @property
    def query_passage(self):  # p_j in L_qp(i)
        return self.pairs

    @property
    def passage_query(self):  # q_j in L_pq(i)
        return None if self.pairs is None else self.pairs.T

    @property
    def query_query(self):  # q_i and q_j share a labelled passage
        return None if self.pairs is None else _any_path(self.pairs, self.pairs.T)

    @property
    def passage_passage(self):  # p_i and p_j share a labelled query
        return None if self.pairs is None else _any_path(self.pairs.T, self.pairs)


@dataclasses.dataclass(frozen=True)
class _HardnessBonus:
    """The detached bonus alpha * s each kind of negative gets (Lan et al. 2025)."""

    own_hard: float = 0.0  # the negatives mined for example i, in row i
    in_batch: float = 0.0  # the other examples' terms of the other tower and hard negatives
    same_tower: float = 0.0  # q_j in L_qp(i), p_j in L_pq(i)

    @classmethod
    def of(cls, alpha: float, target: str) -> _HardnessBonus:
        return cls(own_hard=alpha if target in ("hard", "all") else 0.0,
                   in_batch=alpha if target in ("in_batch", "all") else 0.0,
                   same_tower=alpha if target == "all" else 0.0)


def _hard_negative_logits(q: Array, n: Array, per_example: int, temperature,
                          known: _KnownPositives, bonus: _HardnessBonus) -> Array:
    """Logits [B, B*K] of every query against every hard negative; own ones get own_hard."""
    batch_size, num_negatives = q.shape[0], n.shape[0]
    if num_negatives == 0:
        return jnp.zeros((batch_size, 0), jnp.float32)
    own = (jnp.arange(num_negatives) // per_example)[None, :] == jnp.arange(batch_size)[:, None]
    return _negative_logits(_similarities(q, n), temperature, dropped=known.hard,
                            bonus=jnp.where(own, bonus.own_hard, bonus.in_batch),
                            exclude_diagonal=False)


# ---------------------------------------------------------------------------------------------
# Input checks. Messages name the argument, what was expected and what was found.


def _check_embeddings(query, passage, names=("query", "passage")) -> tuple[int, int]:
    for name, x in zip(names, (query, passage)):
        if jnp.ndim(x) != 2:
            raise ValueError(f"{name} embeddings must be [batch, dim], got shape {jnp.shape(x)}")
    (q_batch, q_dim), (p_batch, p_dim) = jnp.shape(query), jnp.shape(passage)
    if q_batch != p_batch:
        raise ValueError(f"{names[0]} and {names[1]} embeddings must have the same batch size, "
                         f"got {q_batch} and {p_batch}")
    if q_dim != p_dim:
        raise ValueError(f"{names[0]} and {names[1]} embeddings must have the same dim, "
                         f"got {q_dim} and {p_dim}")
    return q_batch, q_dim


def _check_vector(ids, name: str, shape: tuple[int, ...]) -> Array | None:
    """One value per embedding (ids, labels): checks the shape, returns it flat (or None)."""
    if ids is None:
        return None
    ids = jnp.asarray(ids)
    if ids.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {ids.shape}")
    return ids.reshape(-1)


def _check_hardness(alpha, target: str) -> None:
    if target not in HARDNESS_TARGETS:
        raise ConfigError(f"hardness_target must be one of {HARDNESS_TARGETS}, got {target!r}")
    if isinstance(alpha, numbers.Real) and alpha < 0:
        raise ConfigError(f"hardness_alpha must be >= 0, got {alpha}")


def _check_temperature(temperature) -> None:
    if isinstance(temperature, numbers.Real) and not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")


def _flatten_negatives(negatives, batch_size: int, dim: int) -> tuple[Array, int]:
    """[B, K, D] or [B*K, D] -> ([B*K, D], K); row i*K + k is the k-th negative of example i."""
    shape = jnp.shape(negatives)
    if len(shape) == 3:
        if shape[0] != batch_size or shape[2] != dim:
            raise ValueError(f"negatives [B, K, D] must have B={batch_size} and D={dim}, "
                             f"got shape {shape}")
    elif len(shape) == 2:
        if shape[1] != dim or shape[0] % batch_size:
            raise ValueError(f"negatives [B*K, D] must have D={dim} and a multiple of "
                             f"B={batch_size} rows (K per example, example-major), "
                             f"got shape {shape}")
    else:
        raise ValueError("negatives must be [B, K, D] or [B*K, D], "
                         f"got rank {len(shape)} shape {shape}")
    per_example = shape[1] if len(shape) == 3 else shape[0] // batch_size
    return jnp.reshape(negatives, (-1, dim)), per_example


# ---------------------------------------------------------------------------------------------
# Losses.


def samtone_loss(
    query: Array,
    passage: Array,
    *,
    temperature: float = 0.01,
    query_same_tower: bool = True,
    passage_same_tower: bool = False,
    bidirectional: bool = True,
    negatives: Array | None = None,
    query_ids: Array | None = None,
    passage_ids: Array | None = None,
    negative_ids: Array | None = None,
    hardness_alpha: float = 0.0,
    hardness_target: str = "hard",
) -> Array:
    r"""Contrastive loss with same-tower negatives (SamToNe, Moiseev et al. 2023).

    Query -> passage, for example i:

        L_qp(i) = -log e^{s(q_i,p_i)/t} / ( \sum_j e^{s(q_i,p_j)/t} + \sum_m e^{s(q_i,n_m)/t}
                                            + [query_same_tower] \sum_{j!=i} e^{s(q_i,q_j)/t} )

    Passage -> query:

        L_pq(i) = -log e^{s(p_i,q_i)/t} / ( \sum_j e^{s(p_i,q_j)/t}
                                            + [passage_same_tower] \sum_{j!=i} e^{s(p_i,p_j)/t} )

        L = mean_i L_qp(i)                               (bidirectional=False)
        L = (mean_i L_qp(i) + mean_i L_pq(i)) / 2        (bidirectional=True)

    With both same-tower flags off this is the (bidirectional) in-batch sampled softmax.
    The hard negatives n_m appear in every query's denominator (each query sees the whole
    batch's negatives), and only in the query -> passage direction.
    `negatives[i, k]` (or row i*K + k of the flat form) is the k-th negative mined for
    example i. Only the hardness weighting uses that ownership.

    False negatives (query_ids, passage_ids, negative_ids: one id per embedding; equal ids mean
    the same text). (q_i, p_j) is a *labelled pair* when some example k of the batch has
    query_ids[k] == query_ids[i] and passage_ids[k] == passage_ids[j]. A missing id vector
    counts as all-distinct. A term is dropped from row i's denominator when it is a known
    positive, not a negative:
      * p_j (j != i) in L_qp(i) and q_j (j != i) in L_pq(i): (q_i, p_j), resp. (q_j, p_i), is
        a labelled pair. This covers p_j with p_i's passage id, q_j with q_i's query id, and
        a query asked twice with two different passages.
      * q_j in q_i's same-tower terms: q_i and q_j share a labelled passage (in particular
        query_ids[j] == query_ids[i]); p_j in p_i's likewise (share a labelled query).
      * n_m in L_qp(i): negative_ids[m] is the id of a passage labelled for q_i. A hard negative
        equal to a positive is a false negative for the rows that own that positive only. For
        every other row it stays a negative. Without negative_ids no hard negative is dropped.
    A row whose negatives are all dropped has loss 0 and zero, finite gradients.

    Hardness weighting (Lan et al. 2025, Eq. 5; sentence-transformers' `hardness_mode` and
    `hardness_strength`). Selected negative logits get a detached bonus, and the positive
    never does:

        logit = s/t + hardness_alpha * stop_gradient(s)

      "hard"      the negatives mined for example i (n_m with m // K == i), in row i only.
      "in_batch"  the other examples' passages p_j in L_qp(i), the other examples' hard
                  negatives, and the other queries q_j in L_pq(i).
      "all"       every negative term, same-tower terms included.
    "hard" and "in_batch" match sentence-transformers 6.2 `hard_negatives` and
    `in_batch_negatives` in the query -> passage direction. That library weights only that
    direction and never the same-tower terms. Here "in_batch" also weights L_pq's q_j, and
    "all" also weights the same-tower terms. With the same-tower flags off and
    bidirectional=False, "all" equals its `all_negatives`.

    Args:
      query, passage: [B, D] embeddings, raw (they are normalised here).
      temperature: t > 0. sentence-transformers' scale is 1 / t.
      query_same_tower, passage_same_tower: add the same-tower terms of each direction.
      bidirectional: mean of both directions instead of query -> passage alone.
      negatives: hard negatives [B, K, D] or [B*K, D] (example-major).
      query_ids, passage_ids: [B] ids. negative_ids: [B, K] or [B*K], needs passage_ids.
      hardness_alpha: >= 0. 0 disables the weighting.
      hardness_target: "hard", "in_batch" or "all".

    Returns:
      The scalar float32 loss.
    """
    batch_size, dim = _check_embeddings(query, passage)
    _check_temperature(temperature)
    _check_hardness(hardness_alpha, hardness_target)
    query_ids = _check_vector(query_ids, "query_ids", (batch_size,))
    passage_ids = _check_vector(passage_ids, "passage_ids", (batch_size,))
    if negative_ids is not None and (negatives is None or passage_ids is None):
        raise ValueError("negative_ids needs negatives and passage_ids (negatives are dropped by "
                         "comparing their ids with the positives' passage_ids)")
    if negatives is not None:
        negative_ids = _check_vector(negative_ids, "negative_ids", tuple(jnp.shape(negatives)[:-1]))
        negatives, per_example = _flatten_negatives(negatives, batch_size, dim)
    known = _KnownPositives.from_ids(query_ids, passage_ids, negative_ids, batch_size)
    bonus = _HardnessBonus.of(hardness_alpha, hardness_target)

    q, p = l2_normalize(query), l2_normalize(passage)
    s_qp = _similarities(q, p)
    positive = jnp.diagonal(s_qp) / temperature  # s(q_i, p_i) / t

    # L_qp(i): sum_j e^{s(q_i,p_j)/t} + sum_m e^{s(q_i,n_m)/t}
    #          + [query_same_tower] sum_{j!=i} e^{s(q_i,q_j)/t}
    denominator = [_negative_logits(s_qp, temperature, dropped=known.query_passage,
                                    bonus=bonus.in_batch)]
    if negatives is not None:
        denominator.append(_hard_negative_logits(q, l2_normalize(negatives), per_example,
                                                 temperature, known, bonus))
    if query_same_tower:
        denominator.append(_negative_logits(_similarities(q, q), temperature,
                                            dropped=known.query_query, bonus=bonus.same_tower))
    loss_qp = jnp.mean(_softmax_losses(positive, denominator))
    if not bidirectional:
        return loss_qp

    # L_pq(i): sum_j e^{s(p_i,q_j)/t} + [passage_same_tower] sum_{j!=i} e^{s(p_i,p_j)/t}
    denominator = [_negative_logits(s_qp.T, temperature, dropped=known.passage_query,
                                    bonus=bonus.in_batch)]
    if passage_same_tower:
        denominator.append(_negative_logits(_similarities(p, p), temperature,
                                            dropped=known.passage_passage, bonus=bonus.same_tower))
    loss_pq = jnp.mean(_softmax_losses(positive, denominator))
    return 0.5 * (loss_qp + loss_pq)


def in_batch_softmax_loss(
    query: Array,
    passage: Array,
    *,
    temperature: float = 0.01,
    bidirectional: bool = False,
    negatives: Array | None = None,
    query_ids: Array | None = None,
    passage_ids: Array | None = None,
    negative_ids: Array | None = None,
    hardness_alpha: float = 0.0,
    hardness_target: str = "hard",
) -> Array:
    r"""In-batch sampled softmax (Henderson et al. 2017), one-way by default:

        L(i) = -log e^{s(q_i,p_i)/t} / ( \sum_j e^{s(q_i,p_j)/t} + \sum_m e^{s(q_i,n_m)/t} )

    Bidirectional adds the passage -> query softmax over the queries (Yang et al. 2019) and
    averages the two. This is samtone_loss with both same-tower flags off, so ids, negatives
    and hardness mean the same thing there.
    """
    return samtone_loss(
        query, passage, temperature=temperature, query_same_tower=False, passage_same_tower=False,
        bidirectional=bidirectional, negatives=negatives, query_ids=query_ids,
        passage_ids=passage_ids, negative_ids=negative_ids, hardness_alpha=hardness_alpha,
        hardness_target=hardness_target)


def pair_loss(
    query: Array,
    passage: Array,
    *,
    temperature: float = 0.01,
    alpha: float = 0.1,
    query_ids: Array | None = None,
    passage_ids: Array | None = None,
) -> Array:
    r"""PAIR (Ren et al. 2021): query-centric plus passage-centric similarity relations.

        L_q(i) = -log e^{s(q_i,p_i)/t} / \sum_j e^{s(q_i,p_j)/t}
        L_p(i) = -log e^{s(q_i,p_i)/t} / ( e^{s(q_i,p_i)/t} + \sum_{j!=i} e^{s(p_i,p_j)/t} )
        L = mean_i [ (1 - alpha) L_q(i) + alpha L_p(i) ]

    L_p asks the positive pair to be closer than p_i is to the other passages. Ids drop
    false negatives as in samtone_loss: p_j from L_q(i) when (q_i, p_j) is a labelled pair,
    and p_j from L_p(i) when p_i and p_j share a labelled query.
    """
    batch_size, _ = _check_embeddings(query, passage)
    _check_temperature(temperature)
    if isinstance(alpha, numbers.Real) and not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    query_ids = _check_vector(query_ids, "query_ids", (batch_size,))
    passage_ids = _check_vector(passage_ids, "passage_ids", (batch_size,))
    known = _KnownPositives.from_ids(query_ids, passage_ids, None, batch_size)
    q, p = l2_normalize(query), l2_normalize(passage)
    s_qp = _similarities(q, p)
    positive = jnp.diagonal(s_qp) / temperature
    query_centric = _softmax_losses(
        positive, [_negative_logits(s_qp, temperature, dropped=known.query_passage)])
    passage_centric = _softmax_losses(
        positive,
        [_negative_logits(_similarities(p, p), temperature, dropped=known.passage_passage)])
    return jnp.mean((1.0 - alpha) * query_centric + alpha * passage_centric)


def cosent_loss(a: Array, b: Array, labels: Array, *, scale: float = 20.0) -> Array:
    r"""CoSENT (Su 2022): rank the pair cosines in the order of their graded labels.

        cos_i = s(a_i, b_i)
        L = log( 1 + \sum_{(i, j): y_i > y_j} e^{scale (cos_j - cos_i)} )

    This is one log-sum-exp over all ordered pairs of the batch (with a 0 logit for the 1),
    not a per-example mean. It equals sentence-transformers' CoSENTLoss. Only the order of
    the labels matters, and equal labels add nothing.
    """
    batch_size, _ = _check_embeddings(a, b, names=("a", "b"))
    labels = _check_vector(labels, "labels", (batch_size,)).astype(jnp.float32)
    cosine = jnp.sum(l2_normalize(a) * l2_normalize(b), axis=-1)
    ordered = labels[:, None] > labels[None, :]
    pair_logits = jnp.where(ordered, scale * (cosine[None, :] - cosine[:, None]), -jnp.inf)
    return jax.nn.logsumexp(jnp.concatenate([jnp.zeros((1,), jnp.float32),
                                             pair_logits.reshape(-1)]))


def in_batch_accuracy(query: Array, passage: Array, passage_ids: Array | None = None) -> Array:
    """Fraction of queries whose most similar in-batch passage is their own, float32.

    With passage_ids, a top passage that has the positive's id also counts as correct.
    """
    batch_size, _ = _check_embeddings(query, passage)
    top = jnp.argmax(_similarities(l2_normalize(query), l2_normalize(passage)), axis=1)
    correct = top == jnp.arange(batch_size)
    if passage_ids is not None:
        passage_ids = _check_vector(passage_ids, "passage_ids", (batch_size,))
        correct = passage_ids[top] == passage_ids
    return jnp.mean(correct.astype(jnp.float32))
