"""seqio Tasks of (query, passage) pairs for training samtone dual encoders, and their Gin names.

Optional: imports seqio, TensorFlow and TFDS (`pip install samtone[seqio]`); nothing else in
samtone imports this module. Importing it registers three example Tasks built from TFDS
question-answering data. Registering reads nothing: data is only downloaded, prepared and
read when a Task's dataset is asked for.

  samtone_squad              squad/v1.1: question -> the context sentence holding the answer
                             span (sentences split after . ! ? followed by whitespace; an
                             answer crossing a split gets every sentence it touches).
  samtone_natural_questions  natural_questions/default: question -> the annotated long
                             answer (a paragraph, table or list) as plain text, HTML tokens
                             dropped, title first (`title + " " + text`, as BEIR corpora are
                             read). Questions without a long answer are dropped. (NQ-open has
                             questions and short answers only, no passages to retrieve.)
  samtone_trivia_qa          trivia_qa/rc: question -> the first evidence paragraph (Wikipedia
                             pages, then web results; split at newlines) containing the answer
                             or one of its aliases as whole words, case-insensitive (distant
                             supervision, as DPR does). Questions with no such paragraph are
                             dropped. rc.nocontext has no evidence text, hence rc.

Each Task outputs the text features `query`, `passage` (and, from `add_*_task` with
`negatives`, `negatives`) tokenised by a SentencePiece vocabulary with EOS appended after
trimming; `samtone.data.seqio_source.DualEncoderFeatureConverter` turns them into a batch.

Vocabulary. Tasks take a SentencePiece model path; the default is T5's cc_all.32000
(`DEFAULT_VOCABULARY_PATH`, the `spiece.model` of the T5.1.1 checkpoints), right for real
runs from pre-trained T5.1.1. The training loop's `DataConfig.vocabulary` must be the same model
(make_seqio_batch_iterator checks it). From Gin, `tfds_task` registers a Task with the run's
vocabulary and returns its name:

    import samtone.tasks
    include 'gin/runs/train.gin'
    TRAIN_DATA = @tfds_task()
    tfds_task.dataset = 'squad'                  # or natural_questions, trivia_qa
    tfds_task.vocabulary_path = %VOCABULARY
    DataConfig.batch_iterator_factory = @make_seqio_batch_iterator
    make_seqio_batch_iterator.split = 'train'

For one's own TFDS dataset: `add_tfds_retrieval_task(name, tfds_name, query_feature=...,
passage_feature=...)` (feature paths may be nested: "answers/text").
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import seqio
import tensorflow as tf

from samtone.data import seqio_source
from samtone.data.seqio_source import (  # re-exported: the names users look for here
    DualEncoderFeatureConverter, make_seqio_batch_iterator)

DEFAULT_VOCABULARY_PATH = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
SHUFFLE_BUFFER_SIZE = 10_000

__all__ = ["DEFAULT_VOCABULARY_PATH", "DualEncoderFeatureConverter", "add_retrieval_task",
           "add_tfds_retrieval_task", "make_seqio_batch_iterator", "register_tfds_tasks",
           "tfds_task", "vocabulary"]


def vocabulary(path: str = DEFAULT_VOCABULARY_PATH) -> seqio.SentencePieceVocabulary:
    """T5's id conventions (pad 0, EOS 1, unk 2); loaded lazily, on first use."""
    return seqio.SentencePieceVocabulary(path)


# --- preprocessors: raw examples -> {"query", "passage"} strings ---------------------------


def _feature(example: dict, path: str) -> tf.Tensor:
    """`example["a"]["b"]` for the path "a/b"."""
    value = example
    for key in path.split("/"):
        if key not in value:
            raise ValueError(f"feature {path!r}: no {key!r} among {sorted(value)}")
        value = value[key]
    return value


def select_features(dataset: tf.data.Dataset, *, query: str, passage: str,
                    negatives: str | None = None, query_id: str | None = None,
                    passage_id: str | None = None) -> tf.data.Dataset:
    """Keeps the named (possibly nested "a/b") features under samtone's names, nothing else."""
    names = {"query": query, "passage": passage, "negatives": negatives,
             "query_id": query_id, "passage_id": passage_id}
    names = {new: old for new, old in names.items() if old is not None}
    return dataset.map(lambda ex: {new: _feature(ex, old) for new, old in names.items()},
                       num_parallel_calls=tf.data.AUTOTUNE)


def drop_empty_texts(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Strips query and passage and drops pairs where either is empty (files.py rejects them)."""
    def strip(ex):
        return {**ex, "query": tf.strings.strip(ex["query"]),
                "passage": tf.strings.strip(ex["passage"])}

    def non_empty(ex):
        return tf.logical_and(tf.strings.length(ex["query"]) > 0,
                              tf.strings.length(ex["passage"]) > 0)

    return dataset.map(strip, num_parallel_calls=tf.data.AUTOTUNE).filter(non_empty)


def answer_sentence(context: tf.Tensor, answer_start: tf.Tensor,
                    answer_length: tf.Tensor) -> tf.Tensor:
    """The sentence(s) of `context` covering characters [start, start + length).

    Offsets count Unicode code points (as SQuAD's `answer_start`). A sentence ends at
    . ! or ? followed by whitespace or the end of the context.
    """
    chars = tf.strings.unicode_split(context, "UTF-8")
    size = tf.size(chars, out_type=tf.int64)
    is_punctuation = tf.reduce_any(
        tf.equal(chars[:, tf.newaxis], tf.constant([".", "!", "?"])), axis=1)
    next_is_space = tf.concat(
        [tf.strings.regex_full_match(chars[1:], r"\s"), [True]], axis=0)
    ends = tf.where(tf.logical_and(is_punctuation, next_is_space))[:, 0]  # sentence-final chars
    first = tf.cast(answer_start, tf.int64)
    last = first + tf.maximum(tf.cast(answer_length, tf.int64), 1) - 1
    start = tf.reduce_max(tf.concat([[-1], tf.boolean_mask(ends, ends < first)], 0)) + 1
    stop = tf.reduce_min(tf.concat([[size - 1], tf.boolean_mask(ends, ends >= last)], 0)) + 1
    return tf.strings.strip(tf.strings.reduce_join(chars[start:stop]))


def squad_answer_sentence(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """SQuAD -> (question, the context sentence holding the first answer span)."""
    def has_answer(ex):
        return tf.size(ex["answers"]["text"]) > 0  # SQuAD 2.0 has unanswerable questions

    def to_pair(ex):
        answer_start = ex["answers"]["answer_start"][0]
        answer_length = tf.strings.length(ex["answers"]["text"][0], unit="UTF8_CHAR")
        return {"query": ex["question"],
                "passage": answer_sentence(ex["context"], answer_start, answer_length)}

    return dataset.filter(has_answer).map(to_pair, num_parallel_calls=tf.data.AUTOTUNE)


def natural_questions_long_answer(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """NQ -> (question, title + " " + the first annotated long answer without HTML tokens)."""
    def has_long_answer(ex):
        return tf.reduce_any(ex["annotations"]["long_answer"]["start_token"] >= 0)

    def to_pair(ex):
        long_answer = ex["annotations"]["long_answer"]
        annotation = tf.argmax(tf.cast(long_answer["start_token"] >= 0, tf.int32))
        start = long_answer["start_token"][annotation]
        end = long_answer["end_token"][annotation]
        tokens = ex["document"]["tokens"]
        text = tf.boolean_mask(tokens["token"][start:end],
                               tf.logical_not(tokens["is_html"][start:end]))
        passage = tf.strings.join(
            [ex["document"]["title"], tf.strings.reduce_join(text, separator=" ")],
            separator=" ")
        return {"query": ex["question"]["text"], "passage": passage}

    return dataset.filter(has_long_answer).map(to_pair, num_parallel_calls=tf.data.AUTOTUNE)


def _escape_regex(texts: tf.Tensor) -> tf.Tensor:
    return tf.strings.regex_replace(texts, r"([\\.^$|?*+()\[\]{}])", r"\\\1")


def evidence_paragraph(documents: tf.Tensor, answers: tf.Tensor) -> tf.Tensor:
    """The first non-empty newline-separated paragraph of `documents` holding an answer.

    Answers match as whole words (not inside a longer word), case-insensitively. Returns
    "" when no paragraph matches.
    """
    paragraphs = tf.strings.strip(tf.strings.split(documents, "\n").flat_values)
    paragraphs = tf.boolean_mask(paragraphs, tf.strings.length(paragraphs) > 0)
    answers = tf.boolean_mask(answers, tf.strings.length(tf.strings.strip(answers)) > 0)
    pattern = tf.strings.join(
        [r"(?is)(?:.*\W)?(?:", tf.strings.reduce_join(_escape_regex(answers), separator="|"),
         r")(?:\W.*)?"])
    matches = tf.logical_and(tf.size(answers) > 0,
                             tf.strings.regex_full_match(paragraphs, pattern))
    found = tf.boolean_mask(paragraphs, matches)
    return tf.cond(tf.size(found) > 0, lambda: found[0], lambda: tf.constant(""))


def trivia_qa_evidence_paragraph(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """TriviaQA rc -> (question, the first evidence paragraph containing the answer)."""
    def to_pair(ex):
        documents = tf.concat([ex["entity_pages"]["wiki_context"],
                               ex["search_results"]["search_context"]], axis=0)
        answers = tf.concat([[ex["answer"]["value"]], ex["answer"]["aliases"]], axis=0)
        return {"query": ex["question"], "passage": evidence_paragraph(documents, answers)}

    # drop_empty_texts (in every Task) drops the questions without an answer paragraph.
    return dataset.map(to_pair, num_parallel_calls=tf.data.AUTOTUNE)


# --- Task registration ---------------------------------------------------------------------

Preprocessor = Callable[..., tf.data.Dataset]


def add_retrieval_task(name: str, source: seqio.DataSource,
                       text_preprocessors: Sequence[Preprocessor] = (), *,
                       vocabulary_path: str = DEFAULT_VOCABULARY_PATH,
                       shuffle_buffer_size: int | None = SHUFFLE_BUFFER_SIZE) -> str:
    """Registers (or replaces) a retrieval Task over any seqio DataSource; returns its name.

    `text_preprocessors` map the source's examples to string features `query`, `passage`
    and optionally `negatives` (a vector), `query_id`, `passage_id`. Then empty pairs are
    dropped, texts tokenised (keeping `*_pretokenized` copies, hashed into ids) and, after
    the cache point, trimmed to the sequence length minus one and EOS appended.
    """
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=[
            *text_preprocessors,
            drop_empty_texts,
            seqio.preprocessors.tokenize,
            seqio.CacheDatasetPlaceholder(),
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features=seqio_source.output_features(vocabulary(vocabulary_path)),
        shuffle_buffer_size=shuffle_buffer_size,
        metric_fns=[],
    )
    return name


def add_tfds_retrieval_task(name: str, tfds_name: str, *, query_feature: str,
                            passage_feature: str, negatives_feature: str | None = None,
                            query_id_feature: str | None = None,
                            passage_id_feature: str | None = None,
                            vocabulary_path: str = DEFAULT_VOCABULARY_PATH,
                            tfds_data_dir: str | None = None,
                            splits: Sequence[str] | None = None,
                            shuffle_buffer_size: int | None = SHUFFLE_BUFFER_SIZE) -> str:
    """A retrieval Task over a TFDS dataset whose features already hold the texts.

    Args:
      name: the seqio Task name (replaced if registered).
      tfds_name: "name/config:version" as for tfds.load.
      query_feature, passage_feature: string features ("a/b" for nested ones).
      negatives_feature: a vector-of-strings feature of hard negatives, if any.
      query_id_feature, passage_id_feature: ids to hash instead of the texts (for
        false-negative masking; the file pipeline's `query_id` / `passage_id`).
      vocabulary_path: the SentencePiece model.
      tfds_data_dir: where TFDS keeps prepared data (default ~/tensorflow_datasets).
      splits: the splits to offer (default all of the dataset's).
    Returns:
      `name`.
    """
    select = functools.partial(
        select_features, query=query_feature, passage=passage_feature,
        negatives=negatives_feature, query_id=query_id_feature, passage_id=passage_id_feature)
    source = seqio.TfdsDataSource(tfds_name, splits=splits, tfds_data_dir=tfds_data_dir)
    return add_retrieval_task(name, source, [select], vocabulary_path=vocabulary_path,
                              shuffle_buffer_size=shuffle_buffer_size)


_TFDS_EXAMPLES = {
    "squad": ("squad/v1.1:3.0.0", squad_answer_sentence),
    "natural_questions": ("natural_questions/default:0.1.0", natural_questions_long_answer),
    "trivia_qa": ("trivia_qa/rc:1.1.0", trivia_qa_evidence_paragraph),
}


def tfds_task(dataset: str = "squad", vocabulary_path: str = DEFAULT_VOCABULARY_PATH, *,
              tfds_data_dir: str | None = None) -> str:
    """Registers `samtone_<dataset>` with this vocabulary and returns its name (for Gin)."""
    if dataset not in _TFDS_EXAMPLES:
        raise ValueError(f"tfds_task.dataset must be one of {sorted(_TFDS_EXAMPLES)}, got "
                         f"{dataset!r}; for other TFDS data use add_tfds_retrieval_task")
    tfds_name, preprocessor = _TFDS_EXAMPLES[dataset]
    source = seqio.TfdsDataSource(tfds_name, splits=("train", "validation"),
                                  tfds_data_dir=tfds_data_dir)
    return add_retrieval_task(f"samtone_{dataset}", source, [preprocessor],
                              vocabulary_path=vocabulary_path)


def register_tfds_tasks(vocabulary_path: str = DEFAULT_VOCABULARY_PATH) -> list[str]:
    """(Re-)registers every example TFDS Task with this vocabulary; returns their names."""
    return [tfds_task(dataset, vocabulary_path) for dataset in _TFDS_EXAMPLES]


register_tfds_tasks()
