"""Throughput of the input pipeline alone: reading, tokenising, then batching.

Writes a synthetic JSONL of (query, passage[, negatives]) pairs to a temporary folder, trains a
small SentencePiece vocabulary on part of it, and prints examples per second for each stage
and the command that produced the numbers. No model, no accelerator.

  python benchmarks/data_pipeline.py                       # 100k pairs, batch 512, 64/256
  python benchmarks/data_pipeline.py --num_negatives 1
  python benchmarks/data_pipeline.py --prepared            # also samtone-prepare, then by row
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time

import numpy as np

from samtone.data import prepare
from samtone.data.files import read_examples
from samtone.data.pipeline import BatchIterator, tokenize_examples
from samtone.data.prepared import PreparedExamples
from samtone.data.tokenizer import Tokenizer, train_sentencepiece


def synthetic_words(rng: np.random.Generator, size: int) -> np.ndarray:
    syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "an", "el", "or", "ut", "ve", "zi"]
    lengths = rng.integers(1, 5, size=size)
    return np.array(["".join(rng.choice(syllables, size=n)) for n in lengths])


def write_pairs(path: str, num_examples: int, num_negatives: int, seed: int = 0) -> None:
    """Zipf-distributed pseudo-words: queries of ~4-15 words, passages of ~40-200."""
    rng = np.random.default_rng(seed)
    vocabulary = synthetic_words(rng, 20_000)

    def texts(count, low, high):
        lengths = rng.integers(low, high, size=count)
        ranks = np.minimum(rng.zipf(1.2, size=lengths.sum()), len(vocabulary)) - 1
        words = vocabulary[ranks]
        ends = np.cumsum(lengths)
        return [" ".join(words[end - n:end]) for end, n in zip(ends, lengths)]

    queries, passages = texts(num_examples, 4, 16), texts(num_examples, 40, 200)
    negatives = [texts(num_examples, 40, 200) for _ in range(num_negatives)]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(num_examples):
            record = {"query": queries[i], "passage": passages[i]}
            if negatives:
                record["negatives"] = [column[i] for column in negatives]
            f.write(json.dumps(record) + "\n")


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_examples", type=int, default=100_000)
    parser.add_argument("--global_batch_size", type=int, default=512)
    parser.add_argument("--query_length", type=int, default=64)
    parser.add_argument("--passage_length", type=int, default=256)
    parser.add_argument("--num_negatives", type=int, default=0)
    parser.add_argument("--vocab_size", type=int, default=2000)
    parser.add_argument("--num_batches", type=int, default=400, help="batches timed per mode")
    parser.add_argument("--prepared", action="store_true", help="also time samtone-prepare "
                        "and batching from the prepared folder (ArrayRecord, read by row)")
    args = parser.parse_args(argv)

    print("command:", shlex.join(["python"] + sys.argv))
    print(f"cpus: {os.cpu_count()}  numpy {np.__version__}")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "pairs.jsonl")
        _, seconds = timed(write_pairs, path, args.num_examples, args.num_negatives)
        megabytes = os.path.getsize(path) / 2**20
        print(f"wrote {args.num_examples} pairs ({megabytes:.0f} MB) in {seconds:.1f} s")
        with open(path, encoding="utf-8") as f:
            sample = [json.loads(next(f))["passage"] for _ in range(10_000)]
        spm_path, seconds = timed(train_sentencepiece, sample, os.path.join(folder, "spm"),
                                  args.vocab_size, num_threads=os.cpu_count() or 1)
        tokenizer = Tokenizer(spm_path)
        print(f"trained a {tokenizer.vocab_size}-piece vocabulary in {seconds:.1f} s (not counted)")

        n = args.num_examples
        examples, read_s = timed(read_examples, path)
        data, tokenize_s = timed(tokenize_examples, examples, tokenizer,
                                 query_length=args.query_length,
                                 passage_length=args.passage_length,
                                 num_negatives=args.num_negatives)
        table_mb = (data.query_table.nbytes + data.passage_table.nbytes) / 2**20
        print(f"read:     {n / read_s:10,.0f} examples/s  ({read_s:.2f} s)")
        print(f"tokenise: {n / tokenize_s:10,.0f} examples/s  ({tokenize_s:.2f} s, "
              f"{table_mb:.0f} MB of token arrays)")
        print(f"read + tokenise: {n / (read_s + tokenize_s):,.0f} examples/s")

        sources = [("in memory", data)]
        if args.prepared:
            settings = prepare.Settings(args.query_length, args.passage_length,
                                        args.num_negatives)
            output = os.path.join(folder, "prepared")
            _, prepare_s = timed(prepare.prepare, path, spm_path, output, settings, shards=8,
                                 progress=False)
            print(f"samtone-prepare: {n / prepare_s:10,.0f} examples/s  ({prepare_s:.2f} s on "
                  f"{os.cpu_count()} processes, read + tokenise + write)")
            sources.append(("prepared", PreparedExamples(output)))
        for (name, source), prefetch in [(source, p) for source in sources for p in (0, 2)]:
            iterator, setup_s = timed(BatchIterator, source,
                                      global_batch_size=args.global_batch_size,
                                      prefetch=prefetch, process_index=0, process_count=1)
            next(iterator)  # start the prefetch thread, first permutation
            start = time.perf_counter()
            for _ in range(args.num_batches):
                batch = next(iterator)
            seconds = time.perf_counter() - start
            iterator.close()
            shapes = {key: value.shape for key, value in batch.items()}
            print(f"batching {name} (prefetch={prefetch}): "
                  f"{args.num_batches * args.global_batch_size / seconds:10,.0f} examples/s, "
                  f"{args.num_batches / seconds:,.0f} batches/s  (setup incl. fingerprint "
                  f"{setup_s:.2f} s; batch {shapes})")


if __name__ == "__main__":
    main()
