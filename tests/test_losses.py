"""samtone.losses against numpy references written from the formulas, and sentence-transformers.

The references loop over terms in float64: row i's denominator is built term by term with the
drop and hardness rules spelled out as in the losses' docstrings.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.test_util import check_grads
from sentence_transformers.sentence_transformer.losses import (CoSENTLoss,
                                                               MultipleNegativesRankingLoss)

from samtone import losses

BATCH, DIM, PER_EXAMPLE = 5, 6, 2
# Examples 0 and 2 ask the same query with different passages, and so do examples 3 and 4.
# Examples 1 and 3 share a passage, so q_1 and q_4 share a labelled passage without sharing
# an id (the chain 1 - 3 - 4). Hard negative (2, 0) has p_0's id, a passage labelled for q_0
# and q_2. Negative (0, 1) has p_1's id, labelled for q_1, q_3 and q_4 but not for q_0,
# which mined it.
QUERY_IDS = np.array([0, 1, 0, 2, 2], np.int32)
PASSAGE_IDS = np.array([7, 8, 9, 8, 6], np.int32)
NEGATIVE_IDS = np.array([[100, 8], [102, 103], [7, 104], [105, 106], [107, 108]], np.int32)
_SAME_TOWER_FLAGS = [(False, False), (True, False), (False, True), (True, True)]


def _embeddings(seed=0, batch=BATCH, dim=DIM, per_example=PER_EXAMPLE):
    rng = np.random.default_rng(seed)
    query = rng.normal(size=(batch, dim)).astype(np.float32)
    passage = (query + 0.7 * rng.normal(size=(batch, dim))).astype(np.float32)
    negatives = (passage[:, None]
                 + 1.0 * rng.normal(size=(batch, per_example, dim))).astype(np.float32)
    return query, passage, negatives


def _embeddings_like_ids(seed=0):
    """Embeddings where equal ids are (nearly) equal vectors, so dropped terms weigh a lot."""
    query, passage, negatives = _embeddings(seed)
    noise = np.random.default_rng(seed + 1000).normal(scale=0.05, size=(5, DIM)).astype(np.float32)
    query[2] = query[0] + noise[0]
    query[4] = query[3] + noise[1]
    passage[3] = passage[1] + noise[2]
    negatives[2, 0] = passage[0] + noise[3]
    negatives[0, 1] = passage[1] + noise[4]
    return query, passage, negatives


# ---------------------------------------------------------------------------------------------
# Numpy references.


def _normalize(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _logsumexp(values):
    values = np.asarray(values, np.float64)
    top = values.max()
    return top + np.log(np.sum(np.exp(values - top)))


def reference_samtone(query, passage, negatives=None, *, temperature, query_same_tower,
                      passage_same_tower, bidirectional, query_ids=None, passage_ids=None,
                      negative_ids=None, hardness_alpha=0.0, hardness_target="hard"):
    q, p = _normalize(query), _normalize(passage)
    batch = len(q)
    qid = [("q", i) for i in range(batch)] if query_ids is None else list(query_ids)
    pid = [("p", i) for i in range(batch)] if passage_ids is None else list(passage_ids)
    hard = []  # (owner, vector, id)
    if negatives is not None:
        n = _normalize(np.reshape(negatives, (batch, -1, q.shape[1])))
        for i in range(batch):
            for k in range(n.shape[1]):
                nid = (("n", i, k) if negative_ids is None
                       else np.reshape(negative_ids, (batch, -1))[i, k])
                hard.append((i, n[i, k], nid))

    def labelled(i, passage_id):  # the batch pairs q_i's id with this passage id
        return any(qid[k] == qid[i] and pid[k] == passage_id for k in range(batch))

    def bonus(kind, own=False):
        weighted = {"hard": {"hard_own"}, "in_batch": {"cross", "hard_other"},
                    "all": {"cross", "hard_own", "hard_other", "same"}}[hardness_target]
        kind = {"hard": "hard_own" if own else "hard_other"}.get(kind, kind)
        return hardness_alpha if kind in weighted else 0.0

    def logit(x, y, kind, own=False):
        cosine = float(x @ y)
        return cosine / temperature + bonus(kind, own) * cosine

    def query_row(i):
        terms = [logit(q[i], p[i], "positive")]
        terms += [logit(q[i], p[j], "cross") for j in range(batch)
                  if j != i and not labelled(i, pid[j])]
        terms += [logit(q[i], vector, "hard", own=owner == i)
                  for owner, vector, nid in hard if not labelled(i, nid)]
        if query_same_tower:
            terms += [logit(q[i], q[j], "same") for j in range(batch) if j != i
                      and not any(labelled(i, pid[m]) and labelled(j, pid[m])
                                  for m in range(batch))]
        return _logsumexp(terms) - terms[0]

    def passage_row(i):
        terms = [logit(p[i], q[i], "positive")]
        terms += [logit(p[i], q[j], "cross") for j in range(batch)
                  if j != i and not labelled(j, pid[i])]
        if passage_same_tower:
            terms += [logit(p[i], p[j], "same") for j in range(batch) if j != i
                      and not any(labelled(m, pid[i]) and labelled(m, pid[j])
                                  for m in range(batch))]
        return _logsumexp(terms) - terms[0]

    loss = np.mean([query_row(i) for i in range(batch)])
    if bidirectional:
        loss = 0.5 * (loss + np.mean([passage_row(i) for i in range(batch)]))
    return loss


def reference_pair(query, passage, *, temperature, alpha, query_ids=None, passage_ids=None):
    q, p = _normalize(query), _normalize(passage)
    batch = len(q)
    qid = list(range(batch)) if query_ids is None else list(query_ids)
    pid = list(range(batch)) if passage_ids is None else list(passage_ids)

    def labelled(i, passage_id):
        return any(qid[k] == qid[i] and pid[k] == passage_id for k in range(batch))

    total = 0.0
    for i in range(batch):
        positive = q[i] @ p[i] / temperature
        query_terms = [positive] + [q[i] @ p[j] / temperature for j in range(batch)
                                    if j != i and not labelled(i, pid[j])]
        passage_terms = [positive] + [p[i] @ p[j] / temperature for j in range(batch) if j != i
                                      and not any(labelled(m, pid[i]) and labelled(m, pid[j])
                                                  for m in range(batch))]
        total += ((1 - alpha) * (_logsumexp(query_terms) - positive)
                  + alpha * (_logsumexp(passage_terms) - positive))
    return total / batch


def reference_cosent(a, b, labels, *, scale):
    cosine = np.sum(_normalize(a) * _normalize(b), axis=1)
    terms = [0.0]
    for i in range(len(labels)):
        for j in range(len(labels)):
            if labels[i] > labels[j]:
                terms.append(scale * (cosine[j] - cosine[i]))
    return _logsumexp(terms)


# ---------------------------------------------------------------------------------------------
# sentence-transformers, fed precomputed embeddings (compute_loss_from_embeddings skips the model).

_ST_HARDNESS = {"hard": "hard_negatives", "in_batch": "in_batch_negatives", "all": "all_negatives"}


def sentence_transformers_mnrl(anchors, candidates, negatives=None, *, temperature, same_tower,
                               hardness_alpha=0.0, hardness_target=None, partition_mode="joint",
                               extra_directions=()):
    directions = (("query_to_doc",) + (("query_to_query",) if same_tower else ())
                  + tuple(extra_directions))
    mode = _ST_HARDNESS[hardness_target] if hardness_alpha and hardness_target else None
    loss = MultipleNegativesRankingLoss(
        model=None, scale=1.0 / temperature, directions=directions, partition_mode=partition_mode,
        hardness_mode=mode, hardness_strength=hardness_alpha if mode else 0.0)
    columns = [anchors, candidates]
    if negatives is not None:  # one column per negative index, as a (q, p, n_1, ..., n_K) dataset
        columns += [negatives[:, k] for k in range(negatives.shape[1])]
    tensors = [torch.tensor(np.asarray(c), dtype=torch.float64) for c in columns]
    return loss.compute_loss_from_embeddings(tensors, labels=None).item()


def _close(actual, expected, tolerance=1e-4):
    np.testing.assert_allclose(float(actual), float(expected), rtol=tolerance, atol=tolerance)


# ---------------------------------------------------------------------------------------------
# SamToNe against the numpy reference.


@pytest.mark.parametrize("hardness_alpha,hardness_target",
                         [(0.0, "hard"), (3.0, "hard"), (3.0, "in_batch"), (3.0, "all")])
@pytest.mark.parametrize("with_ids", [False, True], ids=["no_ids", "duplicate_ids"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["one_way", "bidirectional"])
@pytest.mark.parametrize("query_same_tower,passage_same_tower", _SAME_TOWER_FLAGS)
@pytest.mark.parametrize("negatives_form", [None, "flat", "3d"])
def test_samtone_matches_reference(negatives_form, query_same_tower, passage_same_tower,
                                   bidirectional, with_ids, hardness_alpha, hardness_target):
    query, passage, negatives = _embeddings_like_ids(seed=1)
    ids = {}
    if with_ids:
        ids = dict(query_ids=QUERY_IDS, passage_ids=PASSAGE_IDS)
        if negatives_form is not None:
            ids["negative_ids"] = (NEGATIVE_IDS if negatives_form == "3d"
                                   else NEGATIVE_IDS.reshape(-1))
    given_negatives = {None: None, "3d": negatives,
                       "flat": negatives.reshape(-1, DIM)}[negatives_form]
    options = dict(temperature=0.2, query_same_tower=query_same_tower,
                   passage_same_tower=passage_same_tower, bidirectional=bidirectional,
                   hardness_alpha=hardness_alpha, hardness_target=hardness_target, **ids)
    actual = losses.samtone_loss(query, passage, negatives=given_negatives, **options)
    expected = reference_samtone(query, passage, None if negatives_form is None else negatives,
                                 **options)
    assert actual.dtype == jnp.float32 and actual.shape == ()
    _close(actual, expected)


def test_negative_shapes_agree_and_in_batch_softmax_is_samtone_without_same_tower():
    query, passage, negatives = _embeddings_like_ids(seed=2)
    options = dict(temperature=0.1, hardness_alpha=2.0, hardness_target="all",
                   query_ids=QUERY_IDS, passage_ids=PASSAGE_IDS)
    flat = losses.samtone_loss(query, passage, negatives=negatives.reshape(-1, DIM),
                               negative_ids=NEGATIVE_IDS.reshape(-1), **options)
    nested = losses.samtone_loss(query, passage, negatives=negatives, negative_ids=NEGATIVE_IDS,
                                 **options)
    _close(flat, nested, 1e-6)
    for bidirectional in (False, True):
        in_batch = losses.in_batch_softmax_loss(query, passage, negatives=negatives,
                                                bidirectional=bidirectional, **options)
        samtone = losses.samtone_loss(query, passage, negatives=negatives,
                                      bidirectional=bidirectional, query_same_tower=False,
                                      passage_same_tower=False, **options)
        _close(in_batch, samtone, 1e-6)
    # in_batch_softmax_loss is one-way by default.
    _close(losses.in_batch_softmax_loss(query, passage),
           losses.samtone_loss(query, passage, query_same_tower=False, bidirectional=False), 1e-6)


# ---------------------------------------------------------------------------------------------
# SamToNe against sentence-transformers' MultipleNegativesRankingLoss.

_ST_HARDNESS_CASES = [(0.0, None), (3.0, "hard"), (3.0, "in_batch"), (3.0, "all")]


def _st_comparable(same_tower_flags):
    """(flags, alpha, target) cases; MNRL's all_negatives never weights same-tower terms, ours
    does."""
    return [(*flags, alpha, target)
            for flags in same_tower_flags for alpha, target in _ST_HARDNESS_CASES
            if not (target == "all" and any(flags))]


@pytest.mark.parametrize("with_negatives", [False, True], ids=["pairs", "hard_negatives"])
@pytest.mark.parametrize("query_same_tower,hardness_alpha,hardness_target",
                         _st_comparable([(False,), (True,)]))
def test_one_way_matches_sentence_transformers(query_same_tower, with_negatives, hardness_alpha,
                                               hardness_target):
    query, passage, negatives = _embeddings(seed=3)
    negatives = negatives if with_negatives else None
    temperature = 0.01
    actual = losses.samtone_loss(
        query, passage, negatives=negatives, temperature=temperature,
        query_same_tower=query_same_tower, bidirectional=False, hardness_alpha=hardness_alpha,
        hardness_target=hardness_target or "hard")
    expected = sentence_transformers_mnrl(
        query, passage, negatives, temperature=temperature, same_tower=query_same_tower,
        hardness_alpha=hardness_alpha, hardness_target=hardness_target)
    _close(actual, expected, 2e-4)


@pytest.mark.parametrize("query_same_tower,passage_same_tower,hardness_alpha,hardness_target",
                         _st_comparable(_SAME_TOWER_FLAGS))
def test_bidirectional_matches_sentence_transformers_with_roles_swapped(
        query_same_tower, passage_same_tower, hardness_alpha, hardness_target):
    """Bidirectional = mean of MNRL(q -> p, n) and MNRL with the towers' roles swapped (p -> q)."""
    query, passage, negatives = _embeddings(seed=4)
    temperature = 0.05
    actual = losses.samtone_loss(
        query, passage, negatives=negatives, temperature=temperature,
        query_same_tower=query_same_tower, passage_same_tower=passage_same_tower,
        bidirectional=True, hardness_alpha=hardness_alpha,
        hardness_target=hardness_target or "hard")
    query_to_passage = sentence_transformers_mnrl(
        query, passage, negatives, temperature=temperature, same_tower=query_same_tower,
        hardness_alpha=hardness_alpha, hardness_target=hardness_target)
    # No hard negatives on this side: "hard" weighs nothing.
    passage_to_query = sentence_transformers_mnrl(
        passage, query, temperature=temperature, same_tower=passage_same_tower,
        hardness_alpha=0.0 if hardness_target == "hard" else hardness_alpha,
        hardness_target=hardness_target)
    _close(actual, 0.5 * (query_to_passage + passage_to_query), 2e-4)


@pytest.mark.parametrize("hardness_alpha,hardness_target", [(0.0, None), (3.0, "hard")])
def test_bidirectional_in_batch_matches_sentence_transformers_doc_to_query(
        hardness_alpha, hardness_target):
    """MNRL's per_direction ("query_to_doc", "doc_to_query") is the bidirectional in-batch softmax.

    ("doc_to_doc" has no counterpart: it only exists in MNRL's joint mode, which puts both
    directions in one softmax, GTE's loss, instead of averaging two.)
    """
    query, passage, negatives = _embeddings(seed=5)
    actual = losses.in_batch_softmax_loss(query, passage, negatives=negatives, temperature=0.02,
                                          bidirectional=True, hardness_alpha=hardness_alpha)
    expected = sentence_transformers_mnrl(
        query, passage, negatives, temperature=0.02, same_tower=False,
        hardness_alpha=hardness_alpha, hardness_target=hardness_target,
        partition_mode="per_direction", extra_directions=("doc_to_query",))
    _close(actual, expected, 2e-4)


# ---------------------------------------------------------------------------------------------
# False-negative masking.


def test_masking_a_duplicate_passage_changes_the_loss():
    query, passage, _ = _embeddings(seed=6)
    passage[3] = passage[1]  # the same passage text, answering two different queries
    passage_ids = np.array([10, 11, 12, 11, 14])
    options = dict(temperature=0.05, query_same_tower=True, passage_same_tower=True,
                   bidirectional=True)
    unmasked = losses.samtone_loss(query, passage, **options)
    masked = losses.samtone_loss(query, passage, passage_ids=passage_ids, **options)
    # Unmasked, q_1's denominator holds p_3 = p_1 with the positive's own logit (row 1 alone
    # costs >= log 2), and the passage tower pushes p_1 from itself. Masked, both terms are gone.
    assert float(unmasked) - float(masked) > 0.1
    _close(unmasked, reference_samtone(query, passage, **options))
    _close(masked, reference_samtone(query, passage, passage_ids=passage_ids, **options))


def test_hard_negative_equal_to_a_positive_is_dropped_only_where_it_is_a_positive():
    query, passage, negatives = _embeddings(seed=7)
    negatives[4, 1] = passage[1]  # mined for q_4, but it is q_1's positive
    negative_ids = np.array([[20, 21], [22, 23], [24, 25], [26, 27], [28, 11]])
    passage_ids = np.array([10, 11, 12, 13, 14])
    options = dict(temperature=0.05, bidirectional=False, query_same_tower=False,
                   negatives=negatives)
    unmasked = losses.samtone_loss(query, passage, **options)
    masked = losses.samtone_loss(query, passage, passage_ids=passage_ids, negative_ids=negative_ids,
                                 **options)
    assert float(unmasked) - float(masked) > 0.05
    # Expected: drop n_(4,1) from row 1 only; for q_4 it stays a negative.
    q, p, n = _normalize(query), _normalize(passage), _normalize(negatives.reshape(-1, DIM))
    rows = []
    for i in range(BATCH):
        terms = [q[i] @ p[i] / 0.05] + [q[i] @ p[j] / 0.05 for j in range(BATCH) if j != i]
        terms += [q[i] @ n[m] / 0.05 for m in range(len(n)) if not (i == 1 and m == 9)]
        rows.append(_logsumexp(terms) - terms[0])
    _close(masked, np.mean(rows))


def test_fully_masked_rows_have_zero_loss_and_finite_gradients():
    """Every example shares one query and one passage id: nothing is a negative any more."""
    query, passage, negatives = _embeddings(seed=8)
    ids = np.zeros(BATCH, np.int32)

    def loss_fn(q, p, n):
        return losses.samtone_loss(
            q, p, negatives=n, temperature=0.01, query_same_tower=True, passage_same_tower=True,
            bidirectional=True, query_ids=ids, passage_ids=ids,
            negative_ids=np.zeros((BATCH, PER_EXAMPLE)), hardness_alpha=5.0, hardness_target="all")

    loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1, 2))(query, passage, negatives)
    assert float(loss) == 0.0
    for grad in grads:
        assert np.all(np.isfinite(grad)) and np.allclose(grad, 0.0)


# ---------------------------------------------------------------------------------------------
# Numerical stability, dtypes, gradients.


def test_identical_vectors_at_temperature_001_give_finite_loss_and_gradients():
    vector = np.random.default_rng(9).normal(size=(1, DIM)).astype(np.float32)
    query = np.repeat(vector, BATCH, axis=0)
    negatives = np.repeat(vector[None], BATCH, axis=0).repeat(PER_EXAMPLE, axis=1)
    def loss_fn(q, p, n):
        return losses.samtone_loss(q, p, negatives=n, temperature=0.01, passage_same_tower=True,
                                   hardness_alpha=9.0, hardness_target="all")

    loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1, 2))(query, query.copy(), negatives)
    # Cosine 1 everywhere: the positive logit is 100, each negative's 100 + 9. Query rows have
    # 2(B-1) + BK negatives, passage rows 2(B-1).
    query_negatives, passage_negatives = 2 * (BATCH - 1) + BATCH * PER_EXAMPLE, 2 * (BATCH - 1)
    expected = 0.5 * (np.log1p(query_negatives * np.exp(9.0))
                      + np.log1p(passage_negatives * np.exp(9.0)))
    _close(loss, expected)
    for grad in grads:
        assert np.all(np.isfinite(grad))


def test_zero_vectors_stay_finite():
    query, passage, _ = _embeddings(seed=10)
    query[0] = 0.0
    loss, grads = jax.value_and_grad(losses.samtone_loss, argnums=(0, 1))(query, passage)
    assert np.isfinite(float(loss)) and all(np.all(np.isfinite(g)) for g in grads)


def test_bfloat16_inputs_are_computed_in_float32():
    query, passage, negatives = _embeddings(seed=11, dim=64)
    as_bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (query, passage, negatives)]
    loss_fn = functools.partial(losses.samtone_loss, temperature=0.01, passage_same_tower=True)
    from_bf16 = loss_fn(as_bf16[0], as_bf16[1], negatives=as_bf16[2])
    assert from_bf16.dtype == jnp.float32
    # Exactly the float32 loss of the same (rounded) values: nothing is computed in bfloat16.
    _close(from_bf16, loss_fn(*[x.astype(jnp.float32) for x in as_bf16[:2]],
                              negatives=as_bf16[2].astype(jnp.float32)), 1e-6)
    # Close to the unrounded float32 inputs (bfloat16 keeps ~3 significant digits).
    _close(from_bf16, loss_fn(query, passage, negatives=negatives), 5e-2)
    cosent_bf16 = losses.cosent_loss(as_bf16[0], as_bf16[1], np.arange(BATCH))
    assert cosent_bf16.dtype == jnp.float32
    _close(cosent_bf16, losses.cosent_loss(query, passage, np.arange(BATCH)), 5e-2)


@pytest.mark.parametrize("loss_name", ["samtone", "pair", "cosent"])
def test_gradients_match_finite_differences(loss_name):
    query, passage, negatives = _embeddings(seed=12, batch=4, dim=4)
    if loss_name == "samtone":
        def loss_fn(q, p, n):
            return losses.samtone_loss(q, p, negatives=n, temperature=0.1, passage_same_tower=True,
                                       query_ids=QUERY_IDS[:4], passage_ids=PASSAGE_IDS[:4])
        args = (query, passage, negatives)
    elif loss_name == "pair":
        def loss_fn(q, p):
            return losses.pair_loss(q, p, temperature=0.1, alpha=0.3)
        args = (query, passage)
    else:
        def loss_fn(q, p):
            return losses.cosent_loss(q, p, np.array([0, 3, 1, 5]), scale=5.0)
        args = (query, passage)
    check_grads(loss_fn, args, order=1, modes=("rev",), atol=2e-2, rtol=2e-2, eps=1e-3)


def test_hardness_bonus_carries_no_gradient():
    """grad(loss) = grad of the same softmax with the bonus alpha * s frozen at the current
    point."""
    query, passage, _ = _embeddings(seed=13)
    temperature, alpha = 0.1, 4.0

    def frozen_bonus_loss(q, p, frozen_cosine):
        q, p = losses.l2_normalize(q), losses.l2_normalize(p)
        cosine = q @ p.T
        logits = cosine / temperature + alpha * frozen_cosine * (1.0 - jnp.eye(BATCH))
        return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits))

    frozen = _normalize(query) @ _normalize(passage).T
    expected = jax.grad(frozen_bonus_loss, argnums=(0, 1))(query, passage,
                                                           jnp.asarray(frozen, jnp.float32))
    actual = jax.grad(functools.partial(losses.in_batch_softmax_loss, temperature=temperature,
                                        hardness_alpha=alpha, hardness_target="in_batch"),
                      argnums=(0, 1))(query, passage)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)


def test_jit_matches_eager():
    query, passage, negatives = _embeddings(seed=14)
    loss_fn = functools.partial(losses.samtone_loss, temperature=0.01, passage_same_tower=True,
                                hardness_alpha=1.0, hardness_target="all")
    args = (query, passage, negatives, QUERY_IDS, PASSAGE_IDS, NEGATIVE_IDS)
    jitted = jax.jit(lambda q, p, n, qi, pi, ni: loss_fn(q, p, negatives=n, query_ids=qi,
                                                         passage_ids=pi, negative_ids=ni))
    _close(jitted(*args), loss_fn(query, passage, negatives=negatives, query_ids=QUERY_IDS,
                                  passage_ids=PASSAGE_IDS, negative_ids=NEGATIVE_IDS), 1e-5)


# ---------------------------------------------------------------------------------------------
# PAIR, CoSENT, accuracy.


@pytest.mark.parametrize("with_ids", [False, True], ids=["no_ids", "duplicate_ids"])
@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_pair_matches_reference(alpha, with_ids):
    query, passage, _ = _embeddings_like_ids(seed=15)
    ids = dict(query_ids=QUERY_IDS, passage_ids=PASSAGE_IDS) if with_ids else {}
    _close(losses.pair_loss(query, passage, temperature=0.2, alpha=alpha, **ids),
           reference_pair(query, passage, temperature=0.2, alpha=alpha, **ids))


def test_pair_without_passage_term_is_in_batch_softmax():
    query, passage, _ = _embeddings(seed=16)
    _close(losses.pair_loss(query, passage, alpha=0.0),
           losses.in_batch_softmax_loss(query, passage), 1e-6)


@pytest.mark.parametrize("scale", [20.0, 100.0])
def test_cosent_matches_reference_and_sentence_transformers(scale):
    rng = np.random.default_rng(17)
    a, b = rng.normal(size=(2, 8, DIM)).astype(np.float32)
    labels = np.array([0, 5, 3, 3, 1, 4, 0, 2])
    actual = losses.cosent_loss(a, b, labels, scale=scale)
    _close(actual, reference_cosent(a, b, labels, scale=scale))
    st_loss = CoSENTLoss(model=None, scale=scale).compute_loss_from_embeddings(
        [torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)],
        torch.tensor(labels, dtype=torch.float64))
    _close(actual, st_loss.item())


def test_cosent_without_ordered_pairs_is_zero():
    a, b, _ = _embeddings(seed=18)
    assert float(losses.cosent_loss(a, b, np.full(BATCH, 2.0))) == 0.0


def test_in_batch_accuracy():
    query, _, _ = _embeddings(seed=19)
    passage = query.copy()
    assert float(losses.in_batch_accuracy(query, passage)) == 1.0
    passage[[0, 1]] = passage[[1, 0]]
    assert float(losses.in_batch_accuracy(query, passage)) == pytest.approx((BATCH - 2) / BATCH)
    # Examples 0 and 1 are the same pair: q_1's top passage is p_0 (ties go to the first),
    # wrong by index but right by id.
    query[1] = query[0]
    passage = query.copy()
    assert float(losses.in_batch_accuracy(query, passage)) == pytest.approx((BATCH - 1) / BATCH)
    passage_ids = np.array([7, 7, 8, 9, 10])
    assert float(losses.in_batch_accuracy(query, passage, passage_ids)) == 1.0


# ---------------------------------------------------------------------------------------------
# Input validation.


@pytest.mark.parametrize("call,message", [
    (lambda q, p, n: losses.samtone_loss(q, p[:-1]), "same batch size"),
    (lambda q, p, n: losses.samtone_loss(q, p[:, :-1]), "same dim"),
    (lambda q, p, n: losses.samtone_loss(q[0], p), r"\[batch, dim\]"),
    (lambda q, p, n: losses.samtone_loss(q, p, negatives=n[None]), "rank 4"),
    (lambda q, p, n: losses.samtone_loss(q, p, negatives=n[:, :, :-1]), "D=6"),
    (lambda q, p, n: losses.samtone_loss(q, p, negatives=n[:-1]), "B=5"),
    (lambda q, p, n: losses.samtone_loss(q, p, negatives=n.reshape(-1, DIM)[:-1]),
     "multiple of B=5"),
    (lambda q, p, n: losses.samtone_loss(q, p, query_ids=QUERY_IDS[:-1]),
     "query_ids must have shape"),
    (lambda q, p, n: losses.samtone_loss(q, p, negatives=n, passage_ids=PASSAGE_IDS,
                                         negative_ids=NEGATIVE_IDS[:, :1]),
     "negative_ids must have shape"),
    (lambda q, p, n: losses.samtone_loss(q, p, negatives=n, negative_ids=NEGATIVE_IDS),
     "needs negatives and passage_ids"),
    (lambda q, p, n: losses.samtone_loss(q, p, hardness_target="hard_negatives"),
     "hardness_target"),
    (lambda q, p, n: losses.samtone_loss(q, p, hardness_alpha=-1.0), "hardness_alpha"),
    (lambda q, p, n: losses.samtone_loss(q, p, temperature=0.0), "temperature"),
    (lambda q, p, n: losses.pair_loss(q, p[:-1]), "same batch size"),
    (lambda q, p, n: losses.pair_loss(q, p, alpha=1.5), "alpha must be in"),
    (lambda q, p, n: losses.cosent_loss(q, p, np.arange(BATCH - 1)), "labels must have shape"),
])
def test_invalid_inputs_raise(call, message):
    query, passage, negatives = _embeddings()
    with pytest.raises(ValueError, match=message):
        call(query, passage, negatives)
