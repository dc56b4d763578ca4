"""Deterministic, resumable, multi-host batches of tokenised pairs (no TensorFlow).

`make_batch_iterator` reads every example once and tokenises each distinct text once up
front, keeping the token arrays in host memory: fine for fine-tuning sets of up to a few
million pairs (100k pairs at query 64 / passage 256 take ~120 MB). After that a batch is
only a gather from those arrays.

Order. Epoch e visits the examples in the order `np.random.default_rng([seed, e]).permutation(N)`
(or 0..N-1 with `shuffle=False`), so the order depends only on (seed, epoch). Global batch b of
an epoch is `permutation[b*G : (b+1)*G]`; the last `N % G` examples of each epoch's permutation
are dropped, so every batch is full (a different permutation each epoch drops different ones).
Process p of P gets the contiguous slice `[p*G/P, (p+1)*G/P)` of each global batch, so the
processes' slices concatenated in process order are the global batch, whatever P is.

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
import hashlib
import os
import queue
import sys
import threading
from typing import Any, Iterable, Sequence

import numpy as np

from samtone.data.files import Example, PathOrPaths, read_examples, read_sentences

Batch = dict[str, np.ndarray]
_STATE_MUST_MATCH = ("seed", "shuffle", "global_batch_size", "num_examples", "data_fingerprint")


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

    def fingerprint(self) -> str:
        """A hash of every array: equal fingerprints give equal batches."""
        digest = hashlib.blake2b(digest_size=16)
        for field in dataclasses.fields(self):
            array = getattr(self, field.name)
            digest.update(f"{field.name}{None if array is None else array.shape}".encode())
            if array is not None:
                digest.update(np.ascontiguousarray(array).data)
        return digest.hexdigest()

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


def tokenize_examples(examples: Sequence[Example], tokenizer, *, query_length: int,
                      passage_length: int, num_negatives: int = 0) -> TokenizedExamples:
    """Tokenises each distinct query and passage/negative text once with `tokenizer.encode`."""
    if not examples:
        raise ValueError("no examples to batch")
    for i, example in enumerate(examples):
        if len(example.negatives) < num_negatives:
            raise ValueError(
                f"example {i} (query {example.query[:60]!r}) has {len(example.negatives)} "
                f"negatives but num_negatives={num_negatives}; every example needs at least "
                "that many (drop such examples or lower num_negatives)"
            )
    has_label = [example.label is not None for example in examples]
    if any(has_label) and not all(has_label):
        other = has_label.index(not has_label[0])
        raise ValueError(f"example 0 {'has' if has_label[0] else 'has no'} label but example "
                         f"{other} {'has none' if has_label[0] else 'has one'}: either every "
                         "example has a label or none does")
    queries, query_index = _index_texts(e.query for e in examples)
    passages, passage_index = _index_texts(
        [e.passage for e in examples]
        + [n for e in examples for n in e.negatives[:num_negatives]]
    )
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
    return TokenizedExamples(
        query_table=tokenizer.encode(queries, query_length),
        query_index=query_index,
        passage_table=tokenizer.encode(passages, passage_length),
        passage_index=passage_index[:n],
        negative_index=passage_index[n:].reshape(n, num_negatives),
        query_ids=_stable_ids(e.query if e.query_id is None else e.query_id for e in examples),
        passage_ids=passage_ids,
        negative_ids=negative_ids.reshape(n, num_negatives),
        labels=np.array([e.label for e in examples], np.float32) if has_label[0] else None,
    )


Position = tuple[int, int]  # (epoch, batch_in_epoch)


@dataclasses.dataclass(frozen=True, eq=False)
class _Schedule:
    """Which examples make up each position's batch for one process: pure, thread-safe."""

    data: TokenizedExamples
    global_batch_size: int
    seed: int
    shuffle: bool
    num_epochs: int | None
    process_index: int
    process_count: int
    _cache: list = dataclasses.field(default_factory=lambda: [(-1, None)], repr=False)

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.process_count

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

    def epoch_order(self, epoch: int) -> np.ndarray:
        cached_epoch, order = self._cache[0]  # one tuple, swapped atomically: no lock needed
        if cached_epoch != epoch:
            n = len(self.data)
            order = (np.random.default_rng([self.seed, epoch]).permutation(n)
                     if self.shuffle else np.arange(n))
            self._cache[0] = (epoch, order)
        return order

    def batch_at(self, position: Position) -> Batch:
        epoch, batch = position
        start = batch * self.global_batch_size + self.process_index * self.local_batch_size
        return self.data.gather(self.epoch_order(epoch)[start:start + self.local_batch_size])


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


class BatchIterator:
    """Iterates this process's slice of each global batch (a dict of numpy arrays).

    Keys: `query_tokens` int32 [b, Lq], `passage_tokens` int32 [b, Lp], `query_ids` and
    `passage_ids` int32 [b], `negative_tokens` int32 [b, K, Lp] and `negative_ids` int32 [b, K]
    when num_negatives > 0,
    `labels` float32 [b] when the examples have labels; b = global_batch_size / process_count.
    """

    def __init__(self, data: TokenizedExamples, *, global_batch_size: int, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None, process_index: int = 0,
                 process_count: int = 1, prefetch: int = 2):
        self._prefetcher: _Prefetcher | None = None
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        if process_count <= 0 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} must be in [0, process_count="
                             f"{process_count})")
        if global_batch_size % process_count:
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                             f"process_count={process_count}")
        if len(data) < global_batch_size:
            raise ValueError(f"the data has {len(data)} examples, fewer than one global batch "
                             f"of {global_batch_size}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if num_epochs is not None and num_epochs < 0:
            raise ValueError(f"num_epochs must be None (forever) or >= 0, got {num_epochs}")
        self._schedule = _Schedule(data, global_batch_size, int(seed), bool(shuffle), num_epochs,
                                   process_index, process_count)
        self._fingerprint = data.fingerprint()
        self._prefetch = prefetch
        self._position = self._schedule.first()

    @property
    def batches_per_epoch(self) -> int:
        return self._schedule.batches_per_epoch

    @property
    def local_batch_size(self) -> int:
        return self._schedule.local_batch_size

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        if self._position is None:
            raise StopIteration
        if self._prefetch <= 0:
            batch = self._schedule.batch_at(self._position)
        else:
            if self._prefetcher is None:
                self._prefetcher = _Prefetcher(self._schedule, self._position, self._prefetch)
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
        }

    def set_state(self, state: dict) -> None:
        """Continues from a `get_state()` of an iterator over the same data and settings."""
        check_saved_state(state, self.get_state(), position_keys=("epoch", "batch_in_epoch"),
                          must_match=_STATE_MUST_MATCH, what="the data iterator state",
                          saved_for="other data or settings")
        epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise ValueError(f"invalid data iterator position epoch={epoch}, batch_in_epoch="
                             f"{batch} (an epoch has {self.batches_per_epoch} batches)")
        self.close()
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


def make_batch_iterator(data: PathOrPaths | Sequence[Example], *, tokenizer,
                        global_batch_size: int, query_length: int = 64,
                        passage_length: int = 256, num_negatives: int = 0, seed: int = 0,
                        shuffle: bool = True, num_epochs: int | None = None,
                        on_bad_line: str = "error", simcse: bool = False,
                        process_index: int | None = None, process_count: int | None = None,
                        prefetch: int = 2, split: str = "train") -> BatchIterator:
    """Batches of tokenised pairs for this process; see the module docstring for the guarantees.

    Args:
      data: paths/globs for `read_examples` (or `read_sentences` with simcse=True), or a
        sequence of `Example`s already read.
      tokenizer: a `samtone.data.tokenizer.Tokenizer`, or the path of its SentencePiece model.
      global_batch_size: examples per step summed over all processes.
      num_negatives: K hard negatives per example (the first K of each example's negatives;
        an example with fewer is an error) -> `negative_tokens` [b, K, passage_length].
      seed, shuffle: the order of epoch e is `default_rng([seed, e]).permutation`, or file
        order without shuffle.
      num_epochs: None repeats forever; otherwise StopIteration after that many epochs.
      on_bad_line, split: passed to the file readers.
      simcse: read one sentence per line and pair each with itself (query == passage).
      process_index, process_count: default to jax.process_index() / jax.process_count().
      prefetch: batches computed ahead on a background thread; 0 computes them on `next`.
    """
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
    if isinstance(data, list) and data and all(isinstance(e, Example) for e in data):
        examples = data
    elif simcse:
        examples = read_sentences(data, on_bad_line=on_bad_line)
    else:
        examples = read_examples(data, on_bad_line=on_bad_line, split=split)
    tokenized = tokenize_examples(examples, tokenizer, query_length=query_length,
                                  passage_length=passage_length, num_negatives=num_negatives)
    return BatchIterator(tokenized, global_batch_size=global_batch_size, seed=seed,
                         shuffle=shuffle, num_epochs=num_epochs, process_index=process_index,
                         process_count=process_count, prefetch=prefetch)
