"""Top-k retrieval by inner product against passage embeddings kept on the device mesh.

    index = PassageIndex.from_embeddings(passage_embeddings, mesh)       # [N, D] numpy
    scores, indices = index.search(query_embeddings, k=10)               # [Nq, k] each

Layout. The corpus is split by rows over the mesh axes `axis` (default: all of them) into S
shards of R rows, shard s holding corpus rows [s R, (s + 1) R). R is ceil(N / S) rounded up
to whole blocks of B <= MAX_ROWS_PER_BLOCK rows (less than one row of padding per block);
padding rows score -inf and are never returned. The mesh axes not used for rows split each
chunk of queries instead (a 4x2 mesh with rows over 'data' scores two query halves at once
on the 'model' pairs).

Search. Queries go to the devices in chunks of a fixed number of rows (the last one padded,
so one compilation per k serves every chunk). Each device scores its queries against its
rows one block at a time, keeping a running best min(k, R) with `jax.lax.top_k` (or
`jax.lax.approx_max_k`); the shards' candidates are then gathered and reduced to the global
top k. Device memory beyond the corpus is about chunk / Q x B scores (Q query shards),
whatever N and Nq are.

Ties. Equal scores rank the lower corpus index first: `top_k` keeps the lower position of a
tie, and every merge concatenates candidates in corpus order (the running best before the
next block, shard s before shard s + 1). The same rule as samtone.metrics. Approximate mode
keeps no tie rule and may miss true neighbours: it aims at `recall_target` per block on TPU;
elsewhere XLA computes it exactly.

Scores are float32 dot products at `Precision.HIGHEST` (no bf16 passes on TPU or TF32 on
GPU), so "exact" means exact up to float32 summation order. Normalise the rows first for
cosine similarity (samtone.normalize.l2_normalize).

Multi-host: every process builds the index with the same arguments, passing either the
whole corpus (`from_embeddings`) or only the rows its devices hold (`from_chunks` with the
rows of `local_row_ranges`, which an encoder can produce without seeing the rest), and
calls `search` with the same queries; every process gets the full result.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from samtone import partitioning
from samtone.errors import ConfigError

# Each device scores its rows a block at a time, keeping a running top k, so the scores
# in memory are (queries of a chunk) x (rows of a block), whatever the corpus size.
MAX_ROWS_PER_BLOCK = 1 << 15
# Default chunk: about this many scores per device (2^26 float32 = 256 MiB), and at most
# this many queries per device (which keeps a chunk's queries and results small too).
MAX_SCORES_PER_DEVICE = 1 << 26
MAX_QUERIES_PER_DEVICE = 1 << 12

MeshAxes = str | Sequence[str] | None

# (layout, k, approximate, recall_target) -> the jitted search function.
_SEARCH_FNS: dict[tuple, Callable] = {}


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where corpus rows and query rows live on the mesh."""

    mesh: Mesh
    corpus_axes: tuple[str, ...]  # corpus rows are split over these
    query_axes: tuple[str, ...]  # the rest: chunks of queries are split over these
    num_passages: int  # N, the real rows
    rows_per_block: int  # B
    blocks_per_shard: int

    @property
    def rows_per_shard(self) -> int:  # R = B x blocks >= ceil(N / S)
        return self.rows_per_block * self.blocks_per_shard

    @property
    def num_shards(self) -> int:  # S
        return math.prod(self.mesh.shape[a] for a in self.corpus_axes)

    @property
    def num_query_shards(self) -> int:  # Q
        return math.prod(self.mesh.shape[a] for a in self.query_axes)

    @property
    def padded_rows(self) -> int:
        return self.num_shards * self.rows_per_shard

    def corpus_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(self.corpus_axes, None))


def _make_layout(num_passages: int, mesh: Mesh | None, axis: MeshAxes) -> _Layout:
    mesh = partitioning.make_mesh() if mesh is None else mesh
    if axis is None:
        corpus_axes = tuple(mesh.axis_names)
    else:
        corpus_axes = (axis,) if isinstance(axis, str) else tuple(axis)
    unknown = [a for a in corpus_axes if a not in mesh.axis_names]
    if unknown or not corpus_axes or len(set(corpus_axes)) != len(corpus_axes):
        raise ConfigError(f"PassageIndex axis={axis!r}: expected distinct mesh axis names out of "
                          f"{tuple(mesh.axis_names)}")
    if not 0 < num_passages < 2**31:
        raise ValueError(f"PassageIndex needs between 1 and 2^31 - 1 passages, got {num_passages}")
    query_axes = tuple(a for a in mesh.axis_names if a not in corpus_axes)
    num_shards = math.prod(mesh.shape[a] for a in corpus_axes)
    rows = -(-num_passages // num_shards)
    blocks = -(-rows // MAX_ROWS_PER_BLOCK)
    # Equal blocks: less than one row of padding per block.
    return _Layout(mesh, corpus_axes, query_axes, num_passages, -(-rows // blocks), blocks)


def local_row_ranges(num_passages: int, mesh: Mesh | None = None, *,
                     axis: MeshAxes = None) -> list[tuple[int, int]]:
    """The corpus rows [start, stop) this process's devices hold, in order, merged.

    One range covering the corpus on a single host. On several hosts, what each process
    must pass to `PassageIndex.from_chunks` (the rows of each range, in this order).
    """
    layout = _make_layout(num_passages, mesh, axis)
    ranges: list[tuple[int, int]] = []
    for shard in sorted(_local_shards(layout)):
        start = min(shard * layout.rows_per_shard, num_passages)
        stop = min(start + layout.rows_per_shard, num_passages)
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], stop)
        elif stop > start:
            ranges.append((start, stop))
    return ranges


def _local_shards(layout: _Layout) -> dict[int, list[jax.Device]]:
    """Shard number -> this process's devices holding it (replicas over the query axes)."""
    shape = (layout.padded_rows, 1)
    shards: dict[int, list[jax.Device]] = {}
    for device, index in layout.corpus_sharding().addressable_devices_indices_map(shape).items():
        shards.setdefault((index[0].start or 0) // layout.rows_per_shard, []).append(device)
    return shards


class PassageIndex:
    """Passage embeddings [N, D] on a mesh, searchable by inner product; see module doc."""

    def __init__(self, embeddings: jax.Array, layout: _Layout):
        """Use `from_embeddings` or `from_chunks`."""
        self.embeddings = embeddings  # [S R, D] float32, rows >= num_passages are zeros
        self._layout = layout
        self._search_fns: dict[tuple, Callable] = {}

    @property
    def num_passages(self) -> int:
        return self._layout.num_passages

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    @property
    def mesh(self) -> Mesh:
        return self._layout.mesh

    @classmethod
    def from_embeddings(cls, passage_embeddings: np.ndarray, mesh: Mesh | None = None, *,
                        axis: MeshAxes = None) -> PassageIndex:
        """An index of a host array [N, D]; each device receives only its own rows.

        Args:
          passage_embeddings: [N, D]; row j is corpus index j. On several hosts, every
            process passes the same array.
          mesh: default `partitioning.make_mesh()` (all devices).
          axis: mesh axis name(s) splitting the corpus rows; default all axes.
        """
        passages = np.asarray(passage_embeddings)
        if passages.ndim != 2:
            raise ValueError(f"passage_embeddings must be [num_passages, dim], got shape "
                             f"{passages.shape}")
        ranges = local_row_ranges(len(passages), mesh, axis=axis)
        return cls.from_chunks((passages[start:stop] for start, stop in ranges), len(passages),
                               mesh, axis=axis)

    @classmethod
    def from_chunks(cls, chunks: Iterable[np.ndarray], num_passages: int,
                    mesh: Mesh | None = None, *, axis: MeshAxes = None) -> PassageIndex:
        """An index filled from consecutive blocks of rows, e.g. as an encoder produces them.

        Args:
          chunks: arrays [n_i, D] in corpus order: all N rows on one host; on several, the
            rows of `local_row_ranges(num_passages, mesh, axis=axis)` only, in that order.
          num_passages: N, the corpus size (it fixes the layout before any row arrives).

        Host memory holds at most one shard's rows (plus a chunk) at a time: each shard is
        sent to its devices as soon as its rows are complete.
        """
        layout = _make_layout(num_passages, mesh, axis)
        rows = layout.rows_per_shard
        shards = sorted(_local_shards(layout).items())
        expected = sum(stop - start for start, stop in
                       local_row_ranges(num_passages, layout.mesh, axis=layout.corpus_axes))
        pending: list[np.ndarray] = []
        pending_rows = received = 0
        dim = None
        chunk_iter = iter(chunks)
        on_devices: dict[jax.Device, jax.Array] = {}
        for shard, devices in shards:
            real_rows = max(0, min(rows, num_passages - shard * rows))
            if not real_rows:  # all padding (N < S R); filled in below once D is known
                continue
            while pending_rows < real_rows:
                chunk = next(chunk_iter, None)
                if chunk is None:
                    raise ValueError(f"PassageIndex.from_chunks: the chunks held {received} rows, "
                                     f"expected {expected} (num_passages={num_passages})")
                chunk = _check_rows(chunk, dim, f"chunk at row {received}", "rows")
                dim = chunk.shape[1]
                pending.append(chunk)
                pending_rows += len(chunk)
                received += len(chunk)
            taken = np.concatenate(pending) if len(pending) > 1 else pending[0]
            if real_rows == rows:
                block = taken[:rows]
            else:  # the last shard with real rows: pad with zeros
                block = np.zeros((rows, dim), np.float32)
                block[:real_rows] = taken[:real_rows]
            pending, pending_rows = [taken[real_rows:]], pending_rows - real_rows
            for device in devices:  # sent now, so the host keeps one shard at a time
                on_devices[device] = jax.device_put(block, device)
        received += sum(len(c) for c in chunk_iter)
        if received != expected:
            raise ValueError(f"PassageIndex.from_chunks: the chunks held {received} rows, "
                             f"expected {expected} (num_passages={num_passages})")
        if dim is None:
            raise ConfigError(f"PassageIndex.from_chunks: this process holds only padding rows of "
                              f"the {num_passages} passages over {layout.num_shards} shards; use "
                              f"fewer shards (axis=) than passages")
        for shard, devices in shards:
            for device in devices:
                if device not in on_devices:
                    on_devices[device] = jax.device_put(np.zeros((rows, dim), np.float32), device)
        sharding = layout.corpus_sharding()
        arrays = [on_devices[d] for d in sharding.addressable_devices_indices_map(
            (layout.padded_rows, dim)).keys()]
        embeddings = jax.make_array_from_single_device_arrays((layout.padded_rows, dim), sharding,
                                                              arrays)
        return cls(embeddings, layout)

    def search(self, query_embeddings: np.ndarray, k: int, *,
               exclude: Sequence[Iterable[int]] | None = None,
               max_scores: np.ndarray | None = None, approximate: bool = False,
               recall_target: float = 0.95, chunk_size: int | None = None,
               progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k passages of highest inner product with each query, best first.

        Args:
          query_embeddings: [Nq, D] (the same array on every process).
          k: results per query.
          exclude: Nq collections of corpus indices never returned for that query (known
            positives when mining). Done by asking the devices for k + (largest collection)
            and dropping the excluded on the host.
          max_scores: [Nq]; passages scoring above a query's value are skipped (mining: the
            weakest positive's score minus a margin drops likely false negatives).
          approximate: `jax.lax.approx_max_k` per block instead of exact `top_k`.
          recall_target: approximate mode only, the recall it aims at, in (0, 1].
          chunk_size: queries scored at once, a multiple of the query shards; default:
            about MAX_SCORES_PER_DEVICE scores, MAX_QUERIES_PER_DEVICE queries at most.
          progress: a tqdm bar over chunks; default (None) on a terminal when there is
            more than one chunk.

        Returns:
          scores float32 [Nq, k] and indices int64 [Nq, k], by descending score, ties by
          lower index. Where fewer than k passages qualify (k > N, exclusions, max_scores)
          the row ends with score -inf and index -1.
        """
        queries = _check_rows(query_embeddings, self.dim, "query_embeddings", "num_queries")
        num_queries = len(queries)
        if k < 1:
            raise ConfigError(f"search: k must be >= 1, got {k}")
        all_scores = np.full((num_queries, k), -np.inf, np.float32)
        all_indices = np.full((num_queries, k), -1, np.int64)
        if not num_queries:
            return all_scores, all_indices
        if approximate and not 0 < recall_target <= 1:
            raise ConfigError(f"search: recall_target must be in (0, 1], got {recall_target}")
        excluded_keys, max_excluded = _excluded_keys(exclude, num_queries, self.num_passages)
        if max_scores is None:
            ceilings = np.full(num_queries, np.inf, np.float32)
        else:
            ceilings = np.asarray(max_scores, np.float32)
            if ceilings.shape != (num_queries,) or np.isnan(ceilings).any():
                raise ValueError(f"search: max_scores must be [{num_queries}] numbers, got shape "
                                 f"{ceilings.shape}")
        fetched = min(k + max_excluded, self.num_passages)
        chunk = self._chunk_size(num_queries, chunk_size)
        search_fn = self._search_fn(fetched, approximate, float(recall_target))

        def collect(start, result):
            scores, indices = (np.asarray(x)[:min(chunk, num_queries - start)] for x in result)
            scores, indices = _drop_excluded(scores, indices, start, excluded_keys,
                                             self.num_passages, k)
            stop = start + len(scores)
            all_scores[start:stop, :scores.shape[1]] = scores
            all_indices[start:stop, :indices.shape[1]] = indices

        starts = range(0, num_queries, chunk)
        if progress is None:  # tqdm's disable=None: only on a terminal
            disable = None if len(starts) > 1 and jax.process_index() == 0 else True
        else:
            disable = not progress
        in_flight = None  # fetch chunk i - 1 after dispatching chunk i, so they overlap
        with tqdm.tqdm(total=num_queries, unit="query", desc="search",
                       disable=disable) as bar:
            for start in starts:
                result = search_fn(self.embeddings, self._put(queries, start, chunk),
                                   self._put(ceilings, start, chunk))
                if in_flight is not None:
                    collect(*in_flight)
                    bar.update(chunk)
                in_flight = (start, result)
            collect(*in_flight)
            bar.update(num_queries - bar.n)
        return all_scores, all_indices

    def _chunk_size(self, num_queries: int, chunk_size: int | None) -> int:
        """Queries per chunk: a multiple of the query shards, powers of two when small."""
        shards = self._layout.num_query_shards
        if chunk_size is not None:
            if chunk_size < 1 or chunk_size % shards:
                raise ConfigError(f"search: chunk_size={chunk_size} must be a positive multiple "
                                  f"of the {shards} query shards (mesh axes "
                                  f"{self._layout.query_axes})")
            return chunk_size
        per_shard = max(1, min(MAX_QUERIES_PER_DEVICE,
                               MAX_SCORES_PER_DEVICE // self._layout.rows_per_block))
        needed = -(-num_queries // shards)
        # Powers of two: repeated small searches of varying sizes compile a few shapes only.
        return shards * min(per_shard, 1 << (needed - 1).bit_length())

    def _put(self, values: np.ndarray, start: int, chunk: int) -> jax.Array:
        """values[start:start + chunk] on the devices (rows split over the query axes)."""
        block = values[start:start + chunk]
        if len(block) < chunk:
            block = np.concatenate([block, np.zeros((chunk - len(block),) + block.shape[1:],
                                                    block.dtype)])
        spec = PartitionSpec(self._layout.query_axes or None, *[None] * (block.ndim - 1))
        return jax.make_array_from_callback(block.shape, NamedSharding(self.mesh, spec),
                                            lambda index: block[index])

    def _search_fn(self, k: int, approximate: bool, recall_target: float) -> Callable:
        """The jitted (corpus, queries, ceilings) -> (scores, indices), one per (k, mode)."""
        key = (k, approximate, recall_target if approximate else None)
        if key not in self._search_fns:
            # Shared by every index of this layout: an index rebuilt for each evaluation
            # during training reuses the compiled search.
            shared = (self._layout, *key)
            if shared not in _SEARCH_FNS:
                _SEARCH_FNS[shared] = _make_search_fn(self._layout, k, approximate, recall_target)
            self._search_fns[key] = _SEARCH_FNS[shared]
        return self._search_fns[key]


def _make_search_fn(layout: _Layout, k: int, approximate: bool,
                    recall_target: float) -> Callable:
    corpus_axes, block_rows = layout.corpus_axes, layout.rows_per_block
    shard_k = min(k, layout.rows_per_shard)

    def block_top_k(queries, ceilings, block, first_row):
        """The best min(k, B) of one block of rows; masked rows score -inf."""
        scores = jnp.einsum("qd,pd->qp", queries, block, precision=jax.lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)
        real = first_row + jnp.arange(block_rows) < layout.num_passages
        scores = jnp.where(real[None, :] & (scores <= ceilings[:, None]), scores, -jnp.inf)
        top_k = min(shard_k, block_rows)
        if approximate:
            scores, rows = jax.lax.approx_max_k(scores, top_k, recall_target=recall_target)
        else:
            scores, rows = jax.lax.top_k(scores, top_k)
        return scores, rows + first_row

    def merge(candidates, top_k):
        """top_k of concatenated candidates; earlier columns win ties (lower corpus rows)."""
        scores, best = jax.lax.top_k(candidates[0], top_k)
        return scores, jnp.take_along_axis(candidates[1], best, axis=1)

    def shard_top_k(corpus, queries, ceilings):
        # corpus [R, D] = rows [s R, (s + 1) R); queries [c / Q, D]; ceilings [c / Q].
        shard_first_row = jax.lax.axis_index(corpus_axes) * layout.rows_per_shard

        def block_number_top_k(number):
            # A dynamic slice reads one block; slicing the corpus outside the loop would copy it.
            block = jax.lax.dynamic_slice_in_dim(corpus, number * block_rows, block_rows)
            return block_top_k(queries, ceilings, block, shard_first_row + number * block_rows)

        def add_block(number, best):
            # The running best holds lower rows than this block, so it goes first.
            return merge(_concat(best, block_number_top_k(number)), shard_k)

        scores, rows = block_number_top_k(0)
        missing = ((0, 0), (0, shard_k - scores.shape[1]))  # k > B: room for later blocks
        best = (jnp.pad(scores, missing, constant_values=-jnp.inf),
                jnp.pad(rows, missing, constant_values=-1))
        best = jax.lax.fori_loop(1, layout.blocks_per_shard, add_block, best)
        # Shards in order = corpus order, so the lower-position-first rule still holds.
        scores, indices = merge(_gather(best, corpus_axes, axis=1), k)
        if layout.query_axes:  # every device (and process) returns the whole chunk
            scores, indices = _gather((scores, indices), layout.query_axes, axis=0)
        return scores, indices

    query_spec = PartitionSpec(layout.query_axes or None)
    sharded = jax.shard_map(
        shard_top_k, mesh=layout.mesh,
        in_specs=(PartitionSpec(corpus_axes, None), PartitionSpec(layout.query_axes or None, None),
                  query_spec),
        out_specs=(PartitionSpec(), PartitionSpec()))
    return jax.jit(sharded)


def _concat(first: tuple[jax.Array, ...], second: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    return tuple(jnp.concatenate(pair, axis=1) for pair in zip(first, second))


def _gather(arrays: tuple[jax.Array, ...], axes: tuple[str, ...],
            axis: int) -> tuple[jax.Array, ...]:
    """Each array's shards over mesh `axes` concatenated along `axis` in shard order."""
    return tuple(jax.lax.all_gather(a, axes, axis=axis, tiled=True, to="invarying")
                 for a in arrays)


def _check_rows(array: np.ndarray, dim: int | None, name: str, rows: str) -> np.ndarray:
    """`array` as float32 [n, dim] with finite values, or a ValueError naming it."""
    array = np.asarray(array, np.float32)
    if array.ndim != 2 or (dim is not None and array.shape[1] != dim):
        want = f"[{rows}, {'dim' if dim is None else dim}]"
        raise ValueError(f"{name} must be {want}, got shape {array.shape}")
    if not np.isfinite(array).all():
        row = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
        raise ValueError(f"{name} has a non-finite value in row {row}")
    return array


def _excluded_keys(exclude: Sequence[Iterable[int]] | None, num_queries: int,
                   num_passages: int) -> tuple[np.ndarray, int]:
    """Sorted keys query * N + passage of the excluded pairs, and the largest set's size."""
    if exclude is None:
        return np.zeros(0, np.int64), 0
    if len(exclude) != num_queries:
        raise ValueError(f"search: got {len(exclude)} exclude sets for {num_queries} queries")
    sets = [np.unique(np.fromiter(s, np.int64)) for s in exclude]
    for query, passages in enumerate(sets):
        if len(passages) and (passages[0] < 0 or passages[-1] >= num_passages):
            bad = passages[(passages < 0) | (passages >= num_passages)][0]
            raise ValueError(f"search: exclude[{query}] names passage {bad}, outside the corpus "
                             f"of {num_passages} passages")
    keys = [query * num_passages + passages for query, passages in enumerate(sets)]
    return np.concatenate(keys) if keys else np.zeros(0, np.int64), max(map(len, sets), default=0)


def _drop_excluded(scores: np.ndarray, indices: np.ndarray, first_query: int,
                   excluded_keys: np.ndarray, num_passages: int,
                   k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's first k results that are real (> -inf) and not excluded; -inf / -1 after."""
    indices = indices.astype(np.int64)
    queries = first_query + np.arange(len(indices))
    keys = queries[:, None] * num_passages + indices
    # The sorted keys of this chunk's queries, then a binary search for each result.
    low, high = np.searchsorted(excluded_keys, [queries[0] * num_passages,
                                                (queries[-1] + 1) * num_passages])
    chunk_keys = excluded_keys[low:high]
    dropped = np.isinf(scores)
    if len(chunk_keys):
        found = chunk_keys[np.minimum(np.searchsorted(chunk_keys, keys), len(chunk_keys) - 1)]
        dropped |= found == keys
    # A stable sort of the drop flags moves the kept results to the front, in order.
    order = np.argsort(dropped, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(scores, order, axis=1)
    indices = np.take_along_axis(indices, order, axis=1)
    dropped = np.take_along_axis(dropped, order, axis=1)
    return np.where(dropped, -np.inf, scores).astype(np.float32), np.where(dropped, -1, indices)
