"""Deterministic, resumable, multi-host batches of tokenised pairs (no TensorFlow).

`make_batch_iterator` reads every example once and tokenises each distinct text once up
front, keeping the token arrays in host memory: fine for fine-tuning sets of up to a few
million pairs (100k pairs at query 64 / passage 256 take ~120 MB). After that a batch is
only a gather from those arrays. Beyond that, `samtone-prepare` tokenises the data once into
a folder that `make_batch_iterator` reads by row (samtone.data.prepared): the same batches,
each process reading only the records of its own rows, nothing held per example.

Order. Epoch e visits the examples in a seeded permutation of 0..N-1 (or 0..N-1 itself with
`shuffle=False`) that depends only on (seed, e): position i of epoch e holds example
`index_shuffle(i, N-1, epoch_seed(seed, e))`, grain's random-access permutation (a bijection
computed per index), so a batch costs O(G) whatever N, and nothing of size N is ever held.
Global batch b of an epoch is positions [b*G, (b+1)*G); the last `N % G` positions of each
epoch are dropped, so every batch is full (each epoch drops different examples). Runs saved
before this order (states without "order") resume on the order they began with,
`np.random.default_rng([seed, e]).permutation(N)`.
Each process gets the rows of every global batch that its devices hold (`local_rows`, from
samtone.partitioning.process_batch_rows and the batch sharding), so processes holding the same
rows (replicas along a 'model' axis that spans processes) read the same examples, and all
processes together read the global batch, whatever the mesh. Without `local_rows`, process p
of P gets the contiguous slice `[p*G/P, (p+1)*G/P)`.

Shapes (samtone.data.packing). With `length_buckets` (the default) a batch's token arrays are
cut to the shortest bucket length that holds the longest text of the *global* batch (queries
and passages apart; hard negatives share the passages' length), so every process gets the
same shapes and the step compiles once per bucket. With `pack=True` the texts of the global
batch are packed into rows of the full length, several per row, with segment ids: the batch
then holds `query_tokens` / `query_segment_ids` [Rq, Lq] and `passage_tokens` /
`passage_segment_ids` [Rp, Lp] (the B passages, then the B * K hard negatives example-major),
plus the per-example arrays; it is the whole global batch on every process (each device takes
its rows of it: samtone.train). Packing needs the whole batch, so it decides nothing about which
examples form a batch: the order above alone does.

Workers. By default one background thread computes the next batches (`prefetch`). On a
prepared folder, `worker_processes=W` computes them in W processes instead, through grain's
`MapDataset.range(...).map(batch_at).mp_prefetch(...)`: worker w computes the batches
w, w+W, ... of the schedule and grain interleaves them back in order, so the batches are the
same for every W (each process decodes, cuts and packs only its own batches' records). The
workers start at the iterator's position, so a resume starts them there.

State. `get_state()` is `{"epoch", "batch_in_epoch", "seed", ...}`: the position of the next
batch *to be consumed* plus what must match to resume (seed, shuffle, global batch size, a
fingerprint of the tokenised data). Prefetched-but-unconsumed batches are not counted, so
`set_state(get_state())` on a fresh iterator continues exactly. The process count is not part
of the state: a run may resume on a different number of hosts and see the same global batches.

Ids. `query_ids` / `passage_ids` are the first 4 bytes of blake2b of the given
`query_id` / `passage_id`, or of the text when no id is given, masked to a non-negative int32:
equal texts (or ids) get equal ids on every host and in every Python process. Ids only mask
false negatives, so a rare 31-bit collision (about 1 in 2^31 per pair of distinct texts in a
batch) just masks one extra in-batch negative.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import queue
import sys
import threading
from typing import Any, Iterable, Sequence

import numpy as np

from samtone.data import packing, prepared
from samtone.data.files import (Example, PathOrPaths, expand_paths, read_examples,
                                read_sentences)
from samtone.errors import ConfigError, DataError

Batch = dict[str, np.ndarray]
_STATE_MUST_MATCH = ("seed", "shuffle", "global_batch_size", "num_examples", "data_fingerprint",
                     "order")
INDEX_SHUFFLE = "index_shuffle"  # the order (module docstring)
LEGACY_PERMUTATION = "permutation"  # the order of states saved without "order"
_SHUFFLE_ROUNDS = 4  # Feistel rounds of index_shuffle, as grain's shuffled datasets use


def epoch_seed(seed: int, epoch: int) -> int:
    """index_shuffle's uint32 seed of `epoch`: distinct epochs get unrelated permutations."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def shuffled_positions(positions: np.ndarray, num_examples: int, seed: int) -> np.ndarray:
    """The examples at `positions` of the seeded permutation of range(num_examples)."""
    # grain's import pulls in jax (seconds): only shuffled iterators pay for it.
    from grain.experimental import index_shuffle  # pylint: disable=import-outside-toplevel
    return np.array([index_shuffle(int(i), num_examples - 1, seed, _SHUFFLE_ROUNDS)
                     for i in positions], np.int64)


def stable_id(text: str) -> int:
    """A non-negative int32 from blake2b of the UTF-8 text: the same in every process."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def _stable_ids(identifiers: Iterable[str]) -> np.ndarray:
    return np.fromiter((stable_id(i) for i in identifiers), dtype=np.int32)


def check_saved_state(state: dict, current: dict, *, position_keys: Sequence[str],
                      must_match: Sequence[str], what: str, saved_for: str) -> None:
    """Raises unless `state` has every key and agrees with `current` on `must_match`.

    Shared by the iterators' `set_state`: a resume that would not continue the same batches
    is refused with every mismatch named.
    """
    missing = [key for key in (*position_keys, *must_match) if key not in state]
    if missing:
        raise ValueError(f"{what} lacks {missing}; got keys {sorted(state)}")
    mismatched = [f"{key}: saved {state[key]!r}, now {current[key]!r}"
                  for key in must_match if state[key] != current[key]]
    if mismatched:
        raise ValueError(f"{what} was saved for {saved_for}, so resuming would not continue "
                         "the same batches: " + "; ".join(mismatched))


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedExamples:
    """Token arrays for N examples; each distinct text is tokenised once and indexed."""

    query_table: np.ndarray  # int32 [distinct queries, Lq]
    query_index: np.ndarray  # int32 [N] rows of query_table
    passage_table: np.ndarray  # int32 [distinct passages and negatives, Lp]
    passage_index: np.ndarray  # int32 [N]
    negative_index: np.ndarray  # int32 [N, K]
    query_ids: np.ndarray  # int32 [N]
    passage_ids: np.ndarray  # int32 [N]
    negative_ids: np.ndarray  # int32 [N, K]
    labels: np.ndarray | None  # float32 [N]

    def __len__(self) -> int:
        return len(self.query_index)

    @property
    def query_length(self) -> int:
        return self.query_table.shape[1]

    @property
    def passage_length(self) -> int:
        return self.passage_table.shape[1]

    def fingerprint(self) -> str:
        """A hash of every array: equal fingerprints give equal batches."""
        digest = hashlib.blake2b(digest_size=16)
        for field in dataclasses.fields(self):
            array = getattr(self, field.name)
            digest.update(f"{field.name}{None if array is None else array.shape}".encode())
            if array is not None:
                digest.update(np.ascontiguousarray(array).data)
        return digest.hexdigest()

    @functools.cached_property
    def query_lengths(self) -> np.ndarray:
        """int32 [distinct queries]: tokens of each query, EOS included."""
        return packing.text_lengths(self.query_table)

    @functools.cached_property
    def passage_lengths(self) -> np.ndarray:
        """int32 [distinct passages and negatives]: tokens of each, EOS included."""
        return packing.text_lengths(self.passage_table)

    def longest(self, rows: np.ndarray) -> tuple[int, int]:
        """(longest query, longest passage or hard negative) of the examples `rows`."""
        passages = self.passage_lengths[self.passage_index[rows]]
        negatives = self.passage_lengths[self.negative_index[rows]]
        return (int(self.query_lengths[self.query_index[rows]].max()),
                int(max(passages.max(), negatives.max(initial=0))))

    def gather(self, rows: np.ndarray) -> Batch:
        batch = {
            "query_tokens": self.query_table[self.query_index[rows]],
            "passage_tokens": self.passage_table[self.passage_index[rows]],
            "query_ids": self.query_ids[rows],
            "passage_ids": self.passage_ids[rows],
        }
        if self.negative_index.shape[1]:
            batch["negative_tokens"] = self.passage_table[self.negative_index[rows]]
            batch["negative_ids"] = self.negative_ids[rows]
        if self.labels is not None:
            batch["labels"] = self.labels[rows]
        return batch


def _index_texts(texts: Iterable[str]) -> tuple[list[str], np.ndarray]:
    """(distinct texts in first-seen order, int32 index of each text into them)."""
    rows: dict[str, int] = {}
    index = np.fromiter((rows.setdefault(t, len(rows)) for t in texts), dtype=np.int32)
    return list(rows), index


def check_negatives(examples: Sequence[Example], num_negatives: int) -> None:
    """Every example must have `num_negatives` hard negatives; the first that has not is named
    by its file and line (or its index, for examples made in code)."""
    for i, example in enumerate(examples):
        found = len(example.negatives)
        if found >= num_negatives:
            continue
        if example.source is None:
            raise ConfigError(
                f"example {i} (query {example.query[:60]!r}) has {found} negatives but "
                f"num_negatives={num_negatives}; every example needs at least that many (drop "
                "such examples or lower num_negatives)")
        setting = f"make_batch_iterator.num_negatives = {num_negatives}"
        problem = (f"has only {found}, but {setting} needs {num_negatives} per example (drop "
                   "such examples or lower num_negatives)" if found else
                   f"is missing: {setting} needs {num_negatives} hard negatives per example "
                   "(add them, e.g. with samtone-mine, or lower num_negatives)")
        raise DataError(*example.source, "negatives", problem)


def check_labels(examples: Sequence[Example]) -> bool:
    """Whether the examples have labels: every one has or none has (else a ValueError)."""
    has_label = [example.label is not None for example in examples]
    if any(has_label) and not all(has_label):
        other = has_label.index(not has_label[0])
        raise ValueError(f"example 0 {'has' if has_label[0] else 'has no'} label but example "
                         f"{other} {'has none' if has_label[0] else 'has one'}: either every "
                         "example has a label or none does")
    return has_label[0]


def example_ids(examples: Sequence[Example],
                num_negatives: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int32 (query_ids [N], passage_ids [N], negative_ids [N, K]) (module docstring, Ids)."""
    n = len(examples)
    passage_keys = [e.passage if e.passage_id is None else e.passage_id for e in examples]
    passage_ids = _stable_ids(passage_keys)
    # A negative that is some example's passage gets that passage's id, so the loss can drop
    # it from the rows of the queries it answers (mined "negatives" can be positives too).
    id_of_text = {}
    for example, passage_id in zip(examples, passage_ids):
        id_of_text.setdefault(example.passage, int(passage_id))
    negative_texts = [t for e in examples for t in e.negatives[:num_negatives]]
    negative_ids = np.array([id_of_text.get(t, stable_id(t)) for t in negative_texts], np.int32)
    query_ids = _stable_ids(e.query if e.query_id is None else e.query_id for e in examples)
    return query_ids, passage_ids, negative_ids.reshape(n, num_negatives)


def tokenize_examples(examples: Sequence[Example], tokenizer, *, query_length: int,
                      passage_length: int, num_negatives: int = 0) -> TokenizedExamples:
    """Tokenises each distinct query and passage/negative text once with `tokenizer.encode`."""
    if not examples:
        raise ValueError("no examples to batch")
    check_negatives(examples, num_negatives)
    has_labels = check_labels(examples)
    queries, query_index = _index_texts(e.query for e in examples)
    passages, passage_index = _index_texts(
        [e.passage for e in examples]
        + [n for e in examples for n in e.negatives[:num_negatives]]
    )
    n = len(examples)
    query_ids, passage_ids, negative_ids = example_ids(examples, num_negatives)
    return TokenizedExamples(
        query_table=tokenizer.encode(queries, query_length),
        query_index=query_index,
        passage_table=tokenizer.encode(passages, passage_length),
        passage_index=passage_index[:n],
        negative_index=passage_index[n:].reshape(n, num_negatives),
        query_ids=query_ids,
        passage_ids=passage_ids,
        negative_ids=negative_ids,
        labels=np.array([e.label for e in examples], np.float32) if has_labels else None,
    )


Position = tuple[int, int]  # (epoch, batch_in_epoch)


@dataclasses.dataclass(frozen=True, eq=False)
class _Schedule:
    """Which examples make up each position's batch for one process: pure, thread-safe."""

    data: TokenizedExamples | prepared.PreparedExamples
    global_batch_size: int
    seed: int
    shuffle: bool
    num_epochs: int | None
    rows: np.ndarray  # this process's rows of each global batch, ascending
    query_buckets: list[int]  # bucket lengths; [query_length] alone without buckets
    passage_buckets: list[int]
    pack: bool
    order: str = INDEX_SHUFFLE
    _cache: list = dataclasses.field(default_factory=lambda: [(-1, None)], repr=False)

    @property
    def local_batch_size(self) -> int:
        return len(self.rows)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.data) // self.global_batch_size

    def first(self) -> Position | None:
        return (0, 0) if self.num_epochs != 0 else None

    def after(self, position: Position) -> Position | None:
        """The position following `position`, or None past the last epoch."""
        epoch, batch = position
        epoch, batch = (epoch, batch + 1) if batch + 1 < self.batches_per_epoch else (epoch + 1, 0)
        return None if self.num_epochs is not None and epoch >= self.num_epochs else (epoch, batch)

    def examples_at(self, position: Position) -> np.ndarray:
        """The examples of the global batch at `position`, in their rows' order."""
        epoch, batch = position
        size, n = self.global_batch_size, len(self.data)
        positions = np.arange(batch * size, (batch + 1) * size)
        if not self.shuffle:
            return positions
        if self.order == INDEX_SHUFFLE:
            return shuffled_positions(positions, n, epoch_seed(self.seed, epoch))
        cached_epoch, order = self._cache[0]  # one tuple, swapped atomically: no lock needed
        if cached_epoch != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._cache[0] = (epoch, order)
        return order[positions]

    def batch_at(self, position: Position) -> Batch:
        examples = self.examples_at(position)
        if self.pack:
            return pack_batch(self.data.gather(examples))
        local = self.data.gather(examples[self.rows])
        if len(self.query_buckets) == len(self.passage_buckets) == 1:
            return local
        # The lengths come from the global batch, so every process cuts to the same shapes.
        longest_query, longest_passage = self.data.longest(examples)
        return cut_to_lengths(local, packing.bucket_length(longest_query, self.query_buckets),
                              packing.bucket_length(longest_passage, self.passage_buckets))


def cut_to_lengths(batch: Batch, query_length: int, passage_length: int) -> Batch:
    """`batch` with its query / passage (and hard negative) tokens cut to these lengths."""
    cut = dict(batch)
    for key, length in (("query_tokens", query_length), ("passage_tokens", passage_length),
                        ("negative_tokens", passage_length)):
        if key in cut and cut[key].shape[-1] != length:
            cut[key] = np.ascontiguousarray(cut[key][..., :length])
    return cut


def pack_batch(batch: Batch) -> Batch:
    """A global batch with its texts packed (module docstring; samtone.data.packing.pack)."""
    packed = dict(batch)
    passages = packed.pop("passage_tokens")
    negatives = packed.pop("negative_tokens", None)
    if negatives is not None:
        if "negative_ids" not in batch or "query_ids" not in batch:
            # Their shapes say how many examples and negatives the packed rows hold.
            raise ValueError("a batch with negative_tokens needs query_ids and negative_ids "
                             f"to be packed; it has {sorted(batch)}")
        passages = np.concatenate([passages, negatives.reshape(-1, passages.shape[-1])])
    packed["query_tokens"], packed["query_segment_ids"] = packing.pack(packed["query_tokens"])
    packed["passage_tokens"], packed["passage_segment_ids"] = packing.pack(passages)
    return packed


class _Prefetcher:
    """A daemon thread computing the next `depth` batches ahead, in order."""

    _END = object()

    def __init__(self, schedule: _Schedule, start: Position, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(schedule, start), daemon=True, name="samtone-prefetch")
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _run(self, schedule: _Schedule, position: Position | None) -> None:
        try:
            while position is not None:
                if not self._put((position, schedule.batch_at(position))):
                    return
                position = schedule.after(position)
            self._put(self._END)
        except BaseException as error:  # pylint: disable=broad-except
            self._put(error)  # re-raised in the consuming thread

    def get(self) -> tuple[Position, Batch]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        assert item is not self._END, "the iterator asked past the end of its schedule"
        return item

    def close(self) -> None:
        self._stop.set()
        if threading.current_thread() is not self._thread:  # GC may run on any thread
            self._thread.join()


class _BatchAt:
    """The grain map from a schedule's batch index (over all epochs) to (position, batch)."""

    def __init__(self, schedule: _Schedule):
        self.schedule = schedule

    def __call__(self, index: int) -> tuple[Position, Batch]:
        position = divmod(int(index), self.schedule.batches_per_epoch)
        return position, self.schedule.batch_at(position)


class _WorkerPrefetcher:
    """The batches from `start` on, computed ahead in grain's worker processes, in order."""

    def __init__(self, schedule: _Schedule, start: Position, depth: int, workers: int):
        import grain  # pylint: disable=import-outside-toplevel
        from absl import flags  # pylint: disable=import-outside-toplevel
        if not flags.FLAGS.is_parsed():
            # grain reads its absl flags (their defaults) when it starts workers; a library
            # caller outside absl.app has not parsed any.
            flags.FLAGS.mark_as_parsed()
        per_epoch = schedule.batches_per_epoch
        stop = sys.maxsize if schedule.num_epochs is None else schedule.num_epochs * per_epoch
        dataset = grain.MapDataset.range(start[0] * per_epoch + start[1], stop).map(
            _BatchAt(schedule))
        self._iterator = iter(dataset.to_iter_dataset().mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers,
                                         per_worker_buffer_size=max(1, depth))))

    def get(self) -> tuple[Position, Batch]:
        (epoch, batch_in_epoch), batch = next(self._iterator)
        # Plain arrays: grain's come in shared memory, freed once these copies are made.
        return (int(epoch), int(batch_in_epoch)), {key: np.array(value)
                                                   for key, value in batch.items()}

    def close(self) -> None:
        self._iterator.close()  # stops the worker processes


class BatchIterator:
    """Iterates this process's slice of each global batch (a dict of numpy arrays).

    Keys: `query_tokens` int32 [b, Lq], `passage_tokens` int32 [b, Lp], `query_ids` and
    `passage_ids` int32 [b], `negative_tokens` int32 [b, K, Lp] and `negative_ids` int32 [b, K]
    when num_negatives > 0,
    `labels` float32 [b] when the examples have labels; b = len(local_rows), or
    global_batch_size / process_count without them. Lq and Lp are bucket lengths with
    `length_buckets`. With `pack`, the packed global batch (module docstring): b is the global
    batch size and `global_batches` is True.
    """

    def __init__(self, data: TokenizedExamples | prepared.PreparedExamples, *,
                 global_batch_size: int, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None, process_index: int = 0,
                 process_count: int = 1, prefetch: int = 2,
                 local_rows: Sequence[int] | None = None,
                 length_buckets: bool | Sequence[int] = True, pack: bool = False,
                 worker_processes: int = 0):
        self._prefetcher: _Prefetcher | _WorkerPrefetcher | None = None
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        if process_count <= 0 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} must be in [0, process_count="
                             f"{process_count})")
        if local_rows is None:
            if global_batch_size % process_count:
                raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                                 f"process_count={process_count}")
            size = global_batch_size // process_count
            local_rows = np.arange(process_index * size, (process_index + 1) * size)
        local_rows = np.asarray(local_rows, np.int64)
        if (local_rows.ndim != 1 or not len(local_rows) or np.any(np.diff(local_rows) <= 0)
                or local_rows[0] < 0 or local_rows[-1] >= global_batch_size):
            raise ValueError(f"local_rows must be ascending rows of the global batch of "
                             f"{global_batch_size}, got {local_rows.tolist()[:8]}...")
        if len(data) < global_batch_size:
            raise ValueError(f"the data has {len(data)} examples, fewer than one global batch "
                             f"of {global_batch_size}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if num_epochs is not None and num_epochs < 0:
            raise ValueError(f"num_epochs must be None (forever) or >= 0, got {num_epochs}")
        if not isinstance(worker_processes, (int, np.integer)) or worker_processes < 0:
            raise ValueError(f"worker_processes must be an int >= 0, got {worker_processes!r}")
        if worker_processes and not isinstance(data, prepared.PreparedExamples):
            # Each worker would get a pickled copy of every token array.
            raise ValueError("worker_processes needs PreparedExamples (a prepared folder)")
        self._workers = int(worker_processes)
        self._schedule = _Schedule(
            data, global_batch_size, int(seed), bool(shuffle), num_epochs, local_rows,
            query_buckets=packing.bucket_lengths(length_buckets, data.query_length),
            passage_buckets=packing.bucket_lengths(length_buckets, data.passage_length),
            pack=bool(pack))
        self._fingerprint = data.fingerprint()
        self._prefetch = prefetch
        self._position = self._schedule.first()

    @property
    def batches_per_epoch(self) -> int:
        return self._schedule.batches_per_epoch

    @property
    def local_batch_size(self) -> int:
        return self._schedule.local_batch_size

    @property
    def global_batches(self) -> bool:
        """True when every process gets the whole (packed) global batch."""
        return self._schedule.pack

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        if self._position is None:
            raise StopIteration
        if self._prefetch <= 0 and not self._workers:
            batch = self._schedule.batch_at(self._position)
        else:
            if self._prefetcher is None:
                self._prefetcher = (
                    _WorkerPrefetcher(self._schedule, self._position, self._prefetch,
                                      self._workers) if self._workers else
                    _Prefetcher(self._schedule, self._position, self._prefetch))
            position, batch = self._prefetcher.get()
            assert position == self._position, (position, self._position)
        self._position = self._schedule.after(self._position)
        return batch

    def get_state(self) -> dict:
        """JSON-serialisable: the position of the next batch to consume, plus what must match."""
        schedule = self._schedule
        epoch, batch = (schedule.num_epochs, 0) if self._position is None else self._position
        return {
            "epoch": epoch,
            "batch_in_epoch": batch,
            "seed": schedule.seed,
            "shuffle": schedule.shuffle,
            "global_batch_size": schedule.global_batch_size,
            "num_examples": len(schedule.data),
            "data_fingerprint": self._fingerprint,
            "order": schedule.order,
        }

    def set_state(self, state: dict) -> None:
        """Continues from a `get_state()` of an iterator over the same data and settings."""
        # A state saved before index_shuffle continues on the order its run began with.
        order = state.get("order", LEGACY_PERMUTATION)
        if order not in (INDEX_SHUFFLE, LEGACY_PERMUTATION):
            raise ValueError(f"the data iterator state has an unknown order {order!r}")
        check_saved_state({**state, "order": order}, {**self.get_state(), "order": order},
                          position_keys=("epoch", "batch_in_epoch"),
                          must_match=_STATE_MUST_MATCH, what="the data iterator state",
                          saved_for="other data or settings")
        epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise ValueError(f"invalid data iterator position epoch={epoch}, batch_in_epoch="
                             f"{batch} (an epoch has {self.batches_per_epoch} batches)")
        self.close()
        self._schedule = dataclasses.replace(self._schedule, order=order, _cache=[(-1, None)])
        num_epochs = self._schedule.num_epochs
        self._position = None if num_epochs is not None and epoch >= num_epochs else (epoch, batch)

    def close(self) -> None:
        """Stops the prefetch thread; a later `next` starts a new one."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def __del__(self):
        if not sys.is_finalizing():  # at shutdown the threading module may already be gone
            self.close()


def _describe_data(data: PathOrPaths | list[Example]) -> str:
    """The files `data` names, for messages: 'a.jsonl', or 'a.jsonl, b.jsonl and 3 more'."""
    if isinstance(data, list) and all(isinstance(e, Example) for e in data):
        return "the examples given"
    paths = expand_paths(data)
    shown = ", ".join(paths[:2])
    return shown if len(paths) <= 2 else f"{shown} and {len(paths) - 2} more files"


def _check_batch_fits(num_examples: int, global_batch_size: int,
                      data: PathOrPaths | list[Example]) -> None:
    """One global batch must fit in the data: every batch is full, so none would be left."""
    if isinstance(global_batch_size, (int, np.integer)) and global_batch_size > num_examples:
        raise ConfigError(
            f"BATCH_SIZE (train.global_batch_size) = {global_batch_size} is larger than the "
            f"{num_examples} examples of {_describe_data(data)}; use a smaller batch (at most "
            f"{num_examples})")


def _prepared_folder(data: PathOrPaths | list[Example]) -> str | None:
    """The prepared folder (samtone.data.prepared) `data` names alone, if it names one."""
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], (str, os.PathLike)):
        data = data[0]
    if isinstance(data, (str, os.PathLike)) and prepared.looks_prepared(data):
        return os.fspath(data)
    return None


def make_batch_iterator(data: PathOrPaths | Sequence[Example], *, tokenizer,
                        global_batch_size: int, query_length: int = 64,
                        passage_length: int = 256, num_negatives: int = 0, seed: int = 0,
                        shuffle: bool = True, num_epochs: int | None = None,
                        on_bad_line: str = "error", simcse: bool = False,
                        process_index: int | None = None, process_count: int | None = None,
                        local_rows: Sequence[int] | None = None, prefetch: int = 2,
                        split: str = "train", length_buckets: bool | Sequence[int] = True,
                        pack: bool = False, worker_processes: int = 0) -> BatchIterator:
    """Batches of tokenised pairs for this process; see the module docstring for the guarantees.

    Args:
      data: paths/globs for `read_examples` (or `read_sentences` with simcse=True), a
        sequence of `Example`s already read, or a folder written by samtone-prepare
        (samtone.data.prepared: read by row, nothing held per example; its lengths,
        num_negatives and vocabulary must be these).
      tokenizer: a `samtone.data.tokenizer.Tokenizer`, or the path of its SentencePiece model.
      global_batch_size: examples per step summed over all processes; more than the data
        holds is a ConfigError.
      num_negatives: K hard negatives per example (the first K of each example's negatives;
        an example with fewer is a DataError naming its file and line) -> `negative_tokens`
        [b, K, passage_length].
      seed, shuffle: epoch e's order is a permutation seeded by (seed, e) (module
        docstring), or file order without shuffle.
      num_epochs: None repeats forever; otherwise StopIteration after that many epochs.
      on_bad_line, split: passed to the file readers.
      simcse: read one sentence per line and pair each with itself (query == passage).
      process_index, process_count: default to jax.process_index() / jax.process_count().
      local_rows: the rows of each global batch this process feeds (ascending); the training
        loop passes samtone.partitioning.process_batch_rows. Overrides the process slice.
      prefetch: batches computed ahead on a background thread; 0 computes them on `next`.
      length_buckets: cut each batch's token arrays to the shortest bucket length holding its
        longest text (True: 16, 32, 64, ... and the maximum; a list: those lengths; False:
        always the maximum). See samtone.data.packing.
      pack: pack the global batch's texts several per row with segment ids (module
        docstring); the step then computes on almost no padding.
      worker_processes: with a prepared folder, compute batches in this many grain worker
        processes (module docstring), each holding `prefetch` batches; 0: one thread.
    """
    if (isinstance(worker_processes, bool) or not isinstance(worker_processes, int)
            or worker_processes < 0):
        raise ConfigError("make_batch_iterator.worker_processes must be an integer >= 0, got "
                          f"{worker_processes!r}")
    if simcse and num_negatives:
        raise ValueError("simcse=True pairs each sentence with itself; it has no hard negatives "
                         f"(got num_negatives={num_negatives})")
    if isinstance(tokenizer, (str, os.PathLike)):
        from samtone.data.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel
        tokenizer = Tokenizer(tokenizer)
    if process_index is None or process_count is None:
        import jax  # pylint: disable=import-outside-toplevel
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    data = data if isinstance(data, (str, os.PathLike)) else list(data)
    folder = _prepared_folder(data)
    if folder is not None:
        if simcse:
            raise ConfigError(f"{folder} is a prepared folder (samtone-prepare) of pairs; "
                              "simcse=True needs sentence files")
        examples = prepared.open_prepared(folder, tokenizer=tokenizer, query_length=query_length,
                                          passage_length=passage_length,
                                          num_negatives=num_negatives)
        _check_batch_fits(len(examples), global_batch_size, data)
        return BatchIterator(examples, global_batch_size=global_batch_size, seed=seed,
                             shuffle=shuffle, num_epochs=num_epochs, process_index=process_index,
                             process_count=process_count, prefetch=prefetch,
                             local_rows=local_rows, length_buckets=length_buckets, pack=pack,
                             worker_processes=worker_processes)
    if worker_processes:
        raise ConfigError(f"make_batch_iterator.worker_processes={worker_processes} needs a "
                          f"prepared folder (samtone-prepare) as the data, not "
                          f"{_describe_data(data)}: files are tokenised into this process's "
                          "memory and batched by its prefetch thread")
    if isinstance(data, list) and data and all(isinstance(e, Example) for e in data):
        examples = data
    elif simcse:
        examples = read_sentences(data, on_bad_line=on_bad_line)
    else:
        examples = read_examples(data, on_bad_line=on_bad_line, split=split)
    _check_batch_fits(len(examples), global_batch_size, data)
    tokenized = tokenize_examples(examples, tokenizer, query_length=query_length,
                                  passage_length=passage_length, num_negatives=num_negatives)
    return BatchIterator(tokenized, global_batch_size=global_batch_size, seed=seed,
                         shuffle=shuffle, num_epochs=num_epochs, process_index=process_index,
                         process_count=process_count, prefetch=prefetch, local_rows=local_rows,
                         length_buckets=length_buckets, pack=pack)
