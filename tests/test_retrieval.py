"""samtone.data.retrieval: BEIR folders and held-out pairs as retrieval sets, and every kind of
bad BEIR input named by file, line and id."""
import json
import os

import numpy as np
import pytest

from samtone.data import files, retrieval
from samtone.errors import DataError, MissingFileError


def write(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    return str(path)


def make_beir(folder, qrels=("1\td1\t1", "1\td2\t0", "2\td3\t2", "2\td1\t1", "3\td3\t0")):
    write(folder / "corpus.jsonl", [
        json.dumps({"_id": "d1", "title": "Title one", "text": "first document"}),
        json.dumps({"_id": "d2", "title": "", "text": "second document"}),
        json.dumps({"_id": "d3", "text": "third document"}),
        json.dumps({"_id": "d4", "title": "Only a title", "text": ""}),
    ])
    write(folder / "queries.jsonl", [json.dumps({"_id": str(i), "text": f"query {i}"})
                                     for i in (1, 2, 3, 4)])
    write(folder / "qrels" / "test.tsv", ["query-id\tcorpus-id\tscore", *qrels])
    return folder


def test_beir_folder_gives_whole_corpus_and_judged_queries(tmp_path):
    data = retrieval.read_retrieval_set(str(make_beir(tmp_path / "scifact")))
    assert data.name == "scifact"
    assert data.passage_ids == ["d1", "d2", "d3", "d4"]
    assert data.passages == ["Title one first document", "second document", "third document",
                             "Only a title"]
    assert data.query_ids == ["1", "2", "3"]  # query 4 is judged nowhere: not evaluated
    assert data.queries == ["query 1", "query 2", "query 3"]
    # Every judgement, grade 0 included (query 3 has only a 0: it scores 0 in the means).
    assert list(zip(data.qrels.queries, data.qrels.passages, data.qrels.grades)) == [
        (0, 0, 1.0), (0, 1, 0.0), (1, 2, 2.0), (1, 0, 1.0), (2, 2, 0.0)]


def test_pairs_give_unique_texts_with_their_ids_or_generated_ones(tmp_path):
    rows = [{"query": "a", "passage": "x", "query_id": "qa", "passage_id": "px"},
            {"query": "a", "passage": "y", "query_id": "qa", "passage_id": "py"},
            {"query": "b", "passage": "x", "query_id": "qb", "passage_id": "px"}]
    path = write(tmp_path / "heldout.jsonl", [json.dumps(r) for r in rows])
    data = retrieval.read_retrieval_set(path)
    assert (data.name, data.query_ids, data.queries) == ("heldout", ["qa", "qb"], ["a", "b"])
    assert (data.passage_ids, data.passages) == (["px", "py"], ["x", "y"])
    np.testing.assert_array_equal(np.stack([data.qrels.queries, data.qrels.passages], 1),
                                  [[0, 0], [0, 1], [1, 0]])
    assert data.qrels.grades.tolist() == [1.0, 1.0, 1.0]
    # One text with two ids: ids cannot name the texts, so they are generated.
    rows[2]["passage_id"] = "other"
    write(tmp_path / "heldout.jsonl", [json.dumps(r) for r in rows])
    data = retrieval.read_retrieval_set(path)
    assert (data.query_ids, data.passage_ids) == (["qa", "qb"], ["p0", "p1"])


def test_graded_pairs_and_names(tmp_path):
    example = files.Example
    assert retrieval.is_graded([example("a", "b", label=0.0), example("c", "d", label=4.5)])
    assert not retrieval.is_graded([example("a", "b", label=1.0), example("c", "d", label=1.0)])
    assert not retrieval.is_graded([example("a", "b", label=1.0), example("c", "d")])
    folder = make_beir(tmp_path / "nfcorpus")
    assert retrieval.data_name(str(folder), "dev") == "nfcorpus-dev"
    assert retrieval.data_name(["a/dev.jsonl", "b/more.tsv"]) == "dev+more"


@pytest.mark.parametrize("file, lines, message", [
    ("qrels/test.tsv", ["query-id\tcorpus-id\tscore", "1\td1\t1", "1\td9\t1"],
     r"qrels/test.tsv:3: field 'corpus-id' 'd9' is not in corpus.jsonl"),
    ("qrels/test.tsv", ["query-id\tcorpus-id\tscore", "7\td1\t1"],
     r"qrels/test.tsv:2: field 'query-id' '7' is not in queries.jsonl"),
    ("qrels/test.tsv", ["1\td1\t1", "2\td2\t1", "1\td1\t2"],
     r"qrels/test.tsv:3: query '1' and document 'd1' are judged again \(first on line 1\)"),
    ("corpus.jsonl", ['{"_id": "d1", "text": "x"}', '{"_id": "d2", "text": "y"}',
                      '{"_id": "d1", "text": "z"}'],
     r"corpus.jsonl:3: field '_id' 'd1' repeats the id of line 1"),
    ("corpus.jsonl", ['{"_id": "d1", "text": "x"}', '{"_id": "d2", "title": "t"}'],
     r"corpus.jsonl:2: field 'text' is missing \(id 'd2'\)"),
    ("corpus.jsonl", ['{"_id": "d1", "text": "x"}', '{"_id": "d2", "text": " "}'],
     r"corpus.jsonl:2: field 'text' is empty \(id 'd2'\)"),
    ("queries.jsonl", ['{"_id": "1", "text": "x"}', '{"text": "y"}'],
     r"queries.jsonl:2: field '_id' is missing"),
])
def test_bad_beir_input_names_file_line_and_id(tmp_path, file, lines, message):
    folder = make_beir(tmp_path / "beir")
    write(folder / file, lines)
    with pytest.raises(DataError, match=message):
        retrieval.read_retrieval_set(str(folder))


@pytest.mark.parametrize("missing, message", [
    ("corpus.jsonl", r"has no corpus.jsonl \(.*/beir/corpus.jsonl not found\)"),
    ("queries.jsonl", r"has no queries.jsonl"),
    ("qrels/test.tsv", r"has no qrels/test.tsv \(split='test'; the splits there: dev, train\)"),
])
def test_missing_beir_files_are_named(tmp_path, missing, message):
    folder = make_beir(tmp_path / "beir")
    write(folder / "qrels" / "dev.tsv", ["1\td1\t1"])
    write(folder / "qrels" / "train.tsv", ["1\td1\t1"])
    os.remove(folder / missing)
    with pytest.raises(MissingFileError, match=message):
        retrieval.read_retrieval_set(str(folder))
