"""Writes a prepared folder (samtone.data.prepared) from a seqio Task: `samtone-prepare --task`.

A seqio Task trains through samtone.data.seqio_source, whose resume re-reads and re-tokenises
every batch consumed so far (O(steps)). Prepared once, the Task's split trains through
`make_batch_iterator(FOLDER)` like any prepared folder: a resume is a position (O(1)) and each
host reads only its rows. Why this rather than tf.data's iterator checkpoints: those hold the
shuffle buffers, are not JSON, and do not cover the `tf.numpy_function` that hashes ids.

The split is read once, in order and unshuffled, through the same `Task.get_dataset` and
`DualEncoderFeatureConverter` as make_seqio_batch_iterator: the same tokens (EOS after
trimming), the same query / passage ids (the `query_id` / `passage_id` features, else the
texts' stable_id), the first K negatives. Each hard negative's id is the stable_id of its text
(the `negatives_pretokenized` feature): the id of a passage with that text when the Task's
passages are identified by their text, as the file pipeline gives; with `passage_id` features,
a negative that is another example's passage keeps its text's id (the file pipeline would give
it that passage's id; training from the Task itself masks no hard negative). No labels.

The shards' bounds and lengths.npy need the example count N first. The Task's filters (empty
pairs dropped, negatives kept) make its cardinality unknown, and its source's example count
is taken before them; so, unless tf.data knows the cardinality, a first pass counts the Task's
examples: its preprocessors and tokenisation in TF's threads, without the converter (whose id
hash calls Python per example) and with one small tensor per 4096 examples reaching Python.
The second pass converts and writes. Both passes show progress.
"""
from __future__ import annotations

import importlib
import os
from typing import Iterator, Sequence

import numpy as np
import seqio
import tensorflow as tf
import tqdm

from samtone import output_folder
from samtone.data import prepare
from samtone.data.pipeline import stable_id
from samtone.data.seqio_source import NEGATIVES, PASSAGE, QUERY, DualEncoderFeatureConverter
from samtone.errors import ConfigError
from samtone.vocabulary import same_vocabulary

DEFAULT_TASK_MODULES = ("samtone.tasks",)
CHUNK_SIZE = 4096  # examples per batch reaching Python, in either pass
_CONVERT_CHUNK = 256  # examples converted as one dataset when hard negatives need ids
_NEGATIVE_TEXTS = f"{NEGATIVES}_pretokenized"


def find_task(name: str, modules: Sequence[str] = DEFAULT_TASK_MODULES) -> seqio.Task:
    """The registered seqio Task `name`, after importing the `modules` that register Tasks."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ConfigError(f"--task_module={module}: cannot be imported ({error})") from error
    if name not in seqio.TaskRegistry.names():
        kind = "a seqio Mixture; prepare its Tasks one by one" if (
            name in seqio.MixtureRegistry.names()) else "no seqio Task of that name"
        raise ConfigError(f"--task={name}: {kind} (Tasks registered by importing "
                          f"{', '.join(modules)}; --task_module names the modules to import)")
    return seqio.get_mixture_or_task(name)


def task_vocabulary(task: seqio.Task, vocabulary: str | None = None) -> str:
    """The Task's SentencePiece model as a local file: its own path, or `vocabulary` (a local
    copy, accepted only with the same content)."""
    model = getattr(task.output_features[QUERY].vocabulary, "sentencepiece_model_file", None)
    if model is None:
        raise ConfigError(
            f"--task={task.name}: its vocabulary is a "
            f"{type(task.output_features[QUERY].vocabulary).__name__}, not a SentencePiece "
            "model file; samtone trains on SentencePiece ids (register the Task with "
            "seqio.SentencePieceVocabulary)")
    if vocabulary is not None:
        if not same_vocabulary(model, vocabulary):
            raise ConfigError(f"--vocabulary={vocabulary} is not the SentencePiece model of "
                              f"--task={task.name} ({model}); drop --vocabulary or give a copy "
                              "of that file")
        return vocabulary
    if "://" in model or not os.path.isfile(model):
        raise ConfigError(f"--task={task.name} tokenises with {model}, not a local file; copy "
                          "it locally and pass --vocabulary=<the copy>")
    return model


def converted_dataset(task: seqio.Task, split: str, settings: prepare.Settings, *,
                      seed: int = 0, use_cached: bool = False) -> tf.data.Dataset:
    """The split's examples, unshuffled, once, as make_seqio_batch_iterator converts them,
    plus `negative_ids` [K] (module docstring) when num_negatives = K > 0."""
    k = settings.num_negatives
    lengths = _feature_lengths(settings)
    converter = DualEncoderFeatureConverter(num_negatives=k)
    ds = task.get_dataset(lengths, split=split, use_cached=use_cached, shuffle=False,
                          seed=seed, num_epochs=1)
    if not k:
        return converter(ds, task_feature_lengths=lengths)
    if _NEGATIVE_TEXTS not in ds.element_spec:
        raise ConfigError(f"--task={task.name} has no '{_NEGATIVE_TEXTS}' feature, so hard "
                          "negative ids cannot be computed; tokenize with seqio.preprocessors."
                          "tokenize(copy_pretokenized=True)")

    def convert(chunk):
        # The converter runs on a chunk of examples as a dataset of its own, so that their
        # negative texts, which it drops, stay beside its output; the zip pulls each converted
        # example (and its checks: EOS, at least K negatives) before its ids.
        # (from_tensors + unbatch: from_tensor_slices of ragged features makes TF log a type
        # inference warning.)
        converted = converter(tf.data.Dataset.from_tensors(chunk).unbatch(),
                              task_feature_lengths=lengths)
        texts = chunk[_NEGATIVE_TEXTS][:, :k]
        if isinstance(texts, tf.RaggedTensor):
            texts = texts.to_tensor(default_value="", shape=[None, k])
        ids = tf.numpy_function(_stable_ids, [texts], tf.int32, stateful=False)
        ids = tf.data.Dataset.from_tensors(tf.ensure_shape(ids, [None, k])).unbatch()
        return tf.data.Dataset.zip((converted, ids)).map(
            lambda example, negative_ids: {**example, "negative_ids": negative_ids})

    # Chunks in order, each flattened back in order: the Task's order.
    return ds.ragged_batch(_CONVERT_CHUNK).flat_map(convert)


def count_examples(task: seqio.Task, split: str, settings: prepare.Settings, *,
                   seed: int = 0, use_cached: bool = False, progress: bool = True) -> int:
    """N: the Task's examples of the split (module docstring: the first pass)."""
    ds = task.get_dataset(_feature_lengths(settings), split=split, use_cached=use_cached,
                          shuffle=False, seed=seed, num_epochs=1)
    known = int(ds.cardinality())
    if known >= 0:
        return known
    ones = ds.map(lambda _: tf.constant(1, tf.int8)).batch(CHUNK_SIZE)
    count = 0
    with tqdm.tqdm(unit="ex", desc=f"counting {task.name}/{split}",
                   disable=not progress) as bar:
        for batch in ones.as_numpy_iterator():
            count += len(batch)
            bar.update(len(batch))
    return count


def prepare_task(task_name: str, output: str, settings: prepare.Settings, *,
                 split: str = "train", vocabulary: str | None = None, shards: int = 1,
                 task_modules: Sequence[str] = DEFAULT_TASK_MODULES, seed: int = 0,
                 use_cached: bool = False, overwrite: bool = False,
                 progress: bool = True) -> dict:
    """Reads the Task's split once into the prepared folder `output`; returns its manifest.

    `vocabulary`, if given, must be the Task's SentencePiece model (a local copy of it).
    `seed` is the Task's for any stochastic preprocessor (no shuffling happens). Refuses an
    existing non-empty `output` unless `overwrite` (OutputExistsError), before reading.
    """
    prepare.check_settings(settings, shards)
    output_folder.check_target(output, overwrite, flag="--output")
    task = find_task(task_name, task_modules)
    if split not in task.splits:
        raise ConfigError(f"--task_split={split}: --task={task.name} has the splits "
                          f"{', '.join(task.splits)}")
    vocabulary = task_vocabulary(task, vocabulary)
    n = count_examples(task, split, settings, seed=seed, use_cached=use_cached,
                       progress=progress)
    if not n:
        raise ConfigError(f"--task={task.name} has no examples in split {split!r}")
    bounds = prepare.shard_bounds(n, shards)
    dataset = converted_dataset(task, split, settings, seed=seed, use_cached=use_cached)
    with output_folder.write_atomically(output, overwrite, flag="--output") as folder:
        lengths, pieces = prepare.write_records(
            folder, _chunks(dataset, settings.num_negatives), bounds, progress=progress,
            description=f"samtone-prepare {task.name}/{split}")
        content = prepare.manifest(
            num_examples=n, has_labels=False, settings=settings, vocabulary=vocabulary,
            sources=[f"seqio:{task.name}/{split}"], skipped_lines=0, bounds=bounds,
            lengths=lengths, pieces=pieces)
        del lengths
        prepare.write_manifest(folder, content)
    return content


def _chunks(dataset: tf.data.Dataset, k: int) -> Iterator[tuple[list[bytes], np.ndarray]]:
    """(records, lengths) of each CHUNK_SIZE examples of the converted dataset, in order."""
    for batch in dataset.batch(CHUNK_SIZE).prefetch(2).as_numpy_iterator():
        size = len(batch["query_ids"])
        negatives = batch.get("negative_tokens")
        if negatives is None:
            negatives = np.zeros((size, 0, batch["passage_tokens"].shape[1]), np.int32)
        negative_ids = batch.get("negative_ids", np.zeros((size, k), np.int32))
        yield prepare.encode_rows(
            batch["query_tokens"], batch["passage_tokens"], negatives,
            batch["query_ids"].tolist(), batch["passage_ids"].tolist(), negative_ids.tolist(),
            [None] * size)


def _feature_lengths(settings: prepare.Settings) -> dict[str, int]:
    lengths = {QUERY: settings.query_length, PASSAGE: settings.passage_length}
    if settings.num_negatives:
        lengths[NEGATIVES] = settings.passage_length
    return lengths


def _stable_ids(texts: np.ndarray) -> np.ndarray:
    return np.array([[stable_id(text.decode("utf-8")) for text in row] for row in texts],
                    np.int32).reshape(texts.shape)
