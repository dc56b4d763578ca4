"""seqio Tasks as a samtone batch source: the feature converter and a resumable iterator.

Optional: this module imports seqio and TensorFlow (`pip install samtone[seqio]`), and no
other samtone module imports it; `samtone.tasks` (which registers the example Tasks) does.

A retrieval Task has the text features `query`, `passage` and optionally `negatives` (a
vector of strings), tokenised by its vocabulary with EOS appended after trimming
(`seqio.preprocessors.tokenize` then `append_eos_after_trim`; see samtone.tasks). The
`DualEncoderFeatureConverter` turns them into the arrays of a samtone batch, exactly as
samtone.data.pipeline does for files:

  query_tokens    int32 [Lq]     pieces[:Lq-1] + [EOS=1] + [PAD=0]...
  passage_tokens  int32 [Lp]
  negative_tokens int32 [K, Lp]  the first K negatives (num_negatives=K > 0 only)
  query_ids       int32 []       samtone.data.pipeline.stable_id of the `query_id` feature if
  passage_ids     int32 []       the Task has one, else of the query text (likewise passages)

`make_seqio_batch_iterator` batches a Task for this process and has the `get_state()` /
`set_state()` of samtone.data.pipeline.BatchIterator, so `samtone.train.train` consumes it
through `DataConfig.batch_iterator_factory`.

Resuming skips. The state is the number of batches consumed; `set_state` rebuilds the
tf.data pipeline from the same seed and skips that many batches. The skipped examples are
read and preprocessed again (not fed to the model), so resuming after n steps costs the
input pipeline's time for n batches: at step 100k with a global batch of 1024, about 10^8
examples read and tokenised again, split over the hosts. Pre-tokenise with seqio's cache
(`use_cached=True`) to make that cheaper, or, for long runs, prepare the Task once
(`samtone-prepare --task=NAME`, samtone.data.prepare_task) and train on the folder, which
resumes as a position in O(1) and reads on each host only its rows. (tf.data's own iterator
checkpoints would avoid the skip, but they hold shuffle buffers, are not JSON, and do not
cover the `tf.numpy_function` that hashes ids.)
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import seqio
import tensorflow as tf
from absl import logging

from samtone.data.pipeline import check_saved_state, stable_id
from samtone.errors import ConfigError
from samtone.vocabulary import same_vocabulary

QUERY, PASSAGE, NEGATIVES = "query", "passage", "negatives"
PAD_ID, EOS_ID = 0, 1
_STATE_MUST_MATCH = ("task", "split", "seed", "shuffle", "global_batch_size", "process_count",
                     "num_negatives", "query_length", "passage_length")

Spec = seqio.FeatureConverter.FeatureSpec


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    """The output features of a retrieval Task: EOS-terminated token ids of each text."""
    return {
        QUERY: seqio.Feature(vocabulary, add_eos=True),
        PASSAGE: seqio.Feature(vocabulary, add_eos=True),
        NEGATIVES: seqio.Feature(vocabulary, add_eos=True, rank=2, required=False),
    }


def text_ids(texts: tf.Tensor) -> tf.Tensor:
    """`stable_id` of a scalar string (or integer id) tensor: the file pipeline's int32 id."""
    if texts.dtype != tf.string:
        texts = tf.strings.as_string(texts)  # str(int), as files.py reads integer ids
    ids = tf.numpy_function(lambda text: np.int32(stable_id(text.decode("utf-8"))),
                            [texts], tf.int32, stateful=False)
    ids.set_shape([])
    return ids


class DualEncoderFeatureConverter(seqio.FeatureConverter):
    """Task features (query, passage[, negatives]) -> samtone batch features, padded.

    Each text is its own sequence (no packing). Sequences must already end in EOS (the
    Task's `append_eos_after_trim`); a sequence that does not raises at iteration time.
    With `num_negatives=K > 0` the Task must give at least K negatives per example.

    Task feature lengths: {"query": Lq, "passage": Lp} (+ "negatives": Lp with K > 0).
    """

    TASK_FEATURES = {QUERY: Spec(dtype=tf.int32), PASSAGE: Spec(dtype=tf.int32)}
    MODEL_FEATURES = {
        "query_tokens": Spec(dtype=tf.int32),
        "passage_tokens": Spec(dtype=tf.int32),
        "query_ids": Spec(dtype=tf.int32, rank=0),
        "passage_ids": Spec(dtype=tf.int32, rank=0),
    }
    PACKING_FEATURE_DTYPES = {}

    def __init__(self, num_negatives: int = 0, pack: bool = False, **kwargs):
        if pack:
            raise ValueError("DualEncoderFeatureConverter encodes every text on its own; "
                             "packing (pack=True) is not supported")
        if num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
        self.num_negatives = num_negatives
        if num_negatives:  # per instance: negatives are a task feature only when asked for
            self.TASK_FEATURES = {**self.TASK_FEATURES,
                                  NEGATIVES: Spec(dtype=tf.int32, rank=2, sequence_dim=1)}
            self.MODEL_FEATURES = {**self.MODEL_FEATURES,
                                   "negative_tokens": Spec(dtype=tf.int32, rank=2,
                                                           sequence_dim=1)}
        super().__init__(pack=False, **kwargs)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict:
        lengths = {"query_tokens": task_feature_lengths[QUERY],
                   "passage_tokens": task_feature_lengths[PASSAGE],
                   "query_ids": 1, "passage_ids": 1}  # rank 0: lengths unchecked
        if self.num_negatives:
            lengths["negative_tokens"] = task_feature_lengths[NEGATIVES]
        return lengths

    def _convert_features(self, ds: tf.data.Dataset,
                          task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        query_source = _id_source(ds.element_spec, QUERY)
        passage_source = _id_source(ds.element_spec, PASSAGE)
        num_negatives = self.num_negatives

        def convert(features):
            converted = {
                "query_tokens": _pad(features[QUERY], task_feature_lengths[QUERY], QUERY),
                "passage_tokens": _pad(features[PASSAGE], task_feature_lengths[PASSAGE],
                                       PASSAGE),
                "query_ids": text_ids(features[query_source]),
                "passage_ids": text_ids(features[passage_source]),
            }
            if num_negatives:
                converted["negative_tokens"] = _negatives(
                    features[NEGATIVES], num_negatives, task_feature_lengths[NEGATIVES])
            return converted

        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def _id_source(element_spec: Mapping[str, Any], name: str) -> str:
    """The feature whose hash is `name`'s id: `<name>_id`, else the text `<name>_pretokenized`."""
    for source in (f"{name}_id", f"{name}_pretokenized"):
        if source in element_spec:
            return source
    raise ValueError(
        f"the dataset has neither '{name}_id' nor '{name}_pretokenized', so {name} ids cannot "
        f"be computed; tokenize with seqio.preprocessors.tokenize(copy_pretokenized=True) or "
        f"give the Task a '{name}_id' feature. Features found: {sorted(element_spec)}")


def _assert_ends_with_eos(tokens, name: str) -> list:
    """An assertion that a sequence (or each row of a ragged [K, None]) ends with EOS."""
    if isinstance(tokens, tf.RaggedTensor):
        last = tf.gather(tokens.values, tokens.row_limits() - 1)
    else:
        last = tokens[-1:]
    return [tf.debugging.assert_equal(
        last, tf.fill(tf.shape(last), EOS_ID),
        message=f"Task feature '{name}' does not end with EOS={EOS_ID}; add "
                "seqio.preprocessors.append_eos_after_trim after tokenize in the Task's "
                "preprocessors (with seqio.Feature(add_eos=True))")]


def _pad(tokens: tf.Tensor, length: int, name: str) -> tf.Tensor:
    with tf.control_dependencies(_assert_ends_with_eos(tokens, name)):
        padded = tf.pad(tokens, [[0, length - tf.shape(tokens)[0]]], constant_values=PAD_ID)
    return tf.ensure_shape(padded, [length])


def _negatives(negatives, num_negatives: int, length: int) -> tf.Tensor:
    """The first K tokenised negatives, each padded: int32 [K, length]."""
    if not isinstance(negatives, tf.RaggedTensor):
        negatives = tf.RaggedTensor.from_tensor(negatives, padding=PAD_ID)
    checks = [tf.debugging.assert_greater_equal(
        negatives.nrows(), tf.cast(num_negatives, negatives.row_splits.dtype),
        message=f"an example has fewer than num_negatives={num_negatives} negatives; every "
                "example needs at least that many (filter such examples in the Task or "
                "lower num_negatives)")]
    negatives = negatives[:num_negatives]
    checks += _assert_ends_with_eos(negatives, NEGATIVES)
    with tf.control_dependencies(checks):
        padded = negatives.to_tensor(default_value=PAD_ID, shape=[num_negatives, length])
    return tf.ensure_shape(padded, [num_negatives, length])


class SeqioBatchIterator:
    """This process's batches of a seqio Task, resumable like pipeline.BatchIterator.

    Process p of P reads shard p of P of the Task (seqio.ShardInfo), batched by
    `global_batch_size // P`: the processes' batches together are one global batch.
    """

    def __init__(self, task, split: str, *, global_batch_size: int, query_length: int,
                 passage_length: int, num_negatives: int = 0, seed: int = 0,
                 shuffle: bool = True, num_epochs: int | None = None,
                 process_index: int = 0, process_count: int = 1, use_cached: bool = False):
        if global_batch_size <= 0 or global_batch_size % process_count:
            raise ValueError(f"global_batch_size={global_batch_size} must be positive and "
                             f"divisible by process_count={process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int (seqio is only deterministic "
                             f"with a seed), got {seed!r}")
        self.task = seqio.get_mixture_or_task(task) if isinstance(task, str) else task
        self.split = split
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.feature_lengths = {QUERY: query_length, PASSAGE: passage_length}
        if num_negatives:
            self.feature_lengths[NEGATIVES] = passage_length
        self.converter = DualEncoderFeatureConverter(num_negatives=num_negatives)
        self.seed, self.shuffle, self.num_epochs = int(seed), bool(shuffle), num_epochs
        self.process_index, self.process_count = process_index, process_count
        self.use_cached = use_cached
        self._position = 0  # batches consumed
        self._numpy_iterator = None
        self._last: tuple[int, dict] | None = None  # (position, batch) of the last batch
        self._pushed_back: dict | None = None

    def dataset(self, skip: int = 0) -> tf.data.Dataset:
        """The batched tf.data pipeline, starting after `skip` batches."""
        shard_info = (seqio.ShardInfo(self.process_index, self.process_count)
                      if self.process_count > 1 else None)
        ds = seqio.get_dataset(
            self.task, self.feature_lengths, self.converter, dataset_split=self.split,
            use_cached=self.use_cached, shuffle=self.shuffle, num_epochs=self.num_epochs,
            shard_info=shard_info, seed=self.seed, batch_size=self.local_batch_size,
            verbose=False)
        if skip:
            logging.info("seqio task %s: skipping %d batches to resume (they are read and "
                         "preprocessed again)", self.task.name, skip)
            ds = ds.skip(skip)
        return ds.prefetch(2)

    def __iter__(self) -> SeqioBatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._pushed_back is not None:
            batch, self._pushed_back = self._pushed_back, None
        else:
            if self._numpy_iterator is None:
                self._numpy_iterator = self.dataset(skip=self._position).as_numpy_iterator()
            batch = next(self._numpy_iterator)  # StopIteration after num_epochs
        self._last = (self._position, batch)
        self._position += 1
        return batch

    def get_state(self) -> dict:
        """JSON-serialisable: batches consumed, plus the settings a resume must share."""
        return {
            "batches_consumed": self._position,
            "task": self.task.name,
            "split": self.split,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "global_batch_size": self.global_batch_size,
            "process_count": self.process_count,
            "num_negatives": self.converter.num_negatives,
            "query_length": self.feature_lengths[QUERY],
            "passage_length": self.feature_lengths[PASSAGE],
        }

    def set_state(self, state: dict) -> None:
        """Continues after `state["batches_consumed"]` batches (see the module's cost note)."""
        check_saved_state(state, self.get_state(), position_keys=("batches_consumed",),
                          must_match=_STATE_MUST_MATCH, what="the seqio iterator state",
                          saved_for="another task or other settings (a different "
                                    "process_count reads different shards)")
        position = int(state["batches_consumed"])
        if position < 0:
            raise ValueError(f"batches_consumed must be >= 0, got {position}")
        if position == self._position:
            return
        if (self._last is not None and self._last[0] == position
                and self._pushed_back is None and position + 1 == self._position):
            # Stepping back one batch (a peek, as train.py does): replay it, no rebuild.
            self._pushed_back = self._last[1]
        else:
            self._numpy_iterator = None
            self._pushed_back = None
        self._position = position

    def close(self) -> None:
        self._numpy_iterator = None


def make_seqio_batch_iterator(task_name, split: str = "train", *, global_batch_size: int,
                              query_length: int = 64, passage_length: int = 256,
                              num_negatives: int = 0, seed: int = 0, shuffle: bool = True,
                              num_epochs: int | None = None, tokenizer=None,
                              process_index: int | None = None,
                              process_count: int | None = None,
                              local_rows=None, use_cached: bool = False) -> SeqioBatchIterator:
    """Batches of a seqio Task for this process, with get_state/set_state.

    A drop-in `DataConfig.batch_iterator_factory`: train.py calls it with the Task name as its
    first argument (`DataConfig.train_data`) and these keywords.

    Args:
      task_name: a registered seqio Task or Mixture name (or the object).
      split: the dataset split.
      global_batch_size: examples per step over all processes.
      query_length, passage_length: token lengths, EOS included.
      num_negatives: K -> `negative_tokens` [b, K, passage_length] from the `negatives` feature.
      seed, shuffle: seqio shuffles files and examples with this seed; equal seeds give equal
        batches.
      num_epochs: None repeats forever.
      tokenizer: the training loop's samtone Tokenizer (or its path): checked to be the same
        SentencePiece model as the Task's vocabulary, since evaluation tokenises with it.
      process_index, process_count: default to jax.process_index() / jax.process_count().
      local_rows: the rows of each global batch this process feeds (see
        samtone.data.pipeline): a contiguous, aligned block, read as data shard
        rows[0] // len(rows) of global_batch_size // len(rows), so processes holding the same
        rows read the same shard. Overrides process_index / process_count.
      use_cached: read the Task's seqio cache (see seqio's cache_tasks_main).
    """
    if local_rows is not None:
        process_index, process_count = _data_shard(local_rows, global_batch_size)
    if process_index is None or process_count is None:
        import jax  # pylint: disable=import-outside-toplevel
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    iterator = SeqioBatchIterator(
        task_name, split, global_batch_size=global_batch_size, query_length=query_length,
        passage_length=passage_length, num_negatives=num_negatives, seed=seed,
        shuffle=shuffle, num_epochs=num_epochs, process_index=process_index,
        process_count=process_count, use_cached=use_cached)
    if tokenizer is not None:
        check_same_vocabulary(iterator.task, getattr(tokenizer, "path", tokenizer))
    return iterator


def check_same_vocabulary(task, spm_model_path: str) -> None:
    """Raises ValueError unless `task` tokenises with the SentencePiece model at the path."""
    vocabulary = task.output_features[QUERY].vocabulary
    task_path = getattr(vocabulary, "sentencepiece_model_file", None)
    if task_path is None:
        raise ValueError(f"seqio task {task.name!r} does not use a SentencePieceVocabulary "
                         f"({type(vocabulary).__name__}); samtone needs SentencePiece ids")
    if same_vocabulary(task_path, spm_model_path):
        return
    raise ValueError(
        f"seqio task {task.name!r} tokenises with {task_path!r} but the training vocabulary "
        f"(gin: DataConfig.vocabulary) is {spm_model_path!r}, a different SentencePiece model; "
        "register the task with the same file (e.g. samtone.tasks.tfds_task(..., "
        "vocabulary_path=%VOCABULARY))")


def _data_shard(local_rows, global_batch_size: int) -> tuple[int, int]:
    """(shard index, shard count) of a contiguous aligned block of a global batch's rows."""
    rows = np.asarray(local_rows, np.int64)
    size = len(rows)
    if (not size or global_batch_size % size or rows[0] % size
            or not np.array_equal(rows, np.arange(rows[0], rows[0] + size))):
        raise ConfigError(f"the seqio input needs each process's rows of the global batch of "
                          f"{global_batch_size} to be one aligned block; this mesh gives "
                          f"{rows.tolist()[:8]}... (use the file pipeline for this mesh)")
    return int(rows[0] // size), global_batch_size // size
