"""Readers: every format round-trips, and every kind of bad line is named or counted."""
import json
import logging
import os

import pytest

from samtone.data.files import DataError, Example, ReadStats, read_examples, read_sentences

EXAMPLES = [
    Example("what is jax", "JAX is a numpy-like library.", ("Flax is built on JAX.", "TF is not."),
            label=1.0, query_id="q1", passage_id="p1"),
    Example("tabs\u00a0and ünïcode?", "passage with \"quotes\"", ("only negative",), label=0.5,
            query_id="q2", passage_id="p2"),
]


def write(path, lines, mode="w"):
    path = os.fspath(path)
    with open(path, mode + "b") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (line + "\n").encode("utf-8"))
    return path


def jsonl_line(example: Example, **renamed) -> str:
    record = {"query": example.query, "passage": example.passage,
              "negatives": list(example.negatives), "label": example.label,
              "query_id": example.query_id, "passage_id": example.passage_id}
    for old, new in renamed.items():
        record[new] = record.pop(old)
    return json.dumps({k: v for k, v in record.items() if v is not None})


def test_jsonl_round_trip(tmp_path):
    path = write(tmp_path / "d.jsonl", [jsonl_line(e) for e in EXAMPLES] + [""])
    assert read_examples(path) == EXAMPLES


def test_jsonl_minimal_and_aliases(tmp_path):
    path = write(tmp_path / "d.json", [
        '{"query": "q", "passage": "p"}',
        '{"query": "q", "positive": "p", "hard_negatives": ["n"]}',
        '{"query": "q", "pos": "p", "query_id": 7, "label": 2}',
    ])
    assert read_examples(path) == [
        Example("q", "p"), Example("q", "p", ("n",)), Example("q", "p", label=2.0, query_id="7"),
    ]


def test_tsv_without_header(tmp_path):
    path = write(tmp_path / "d.tsv", ["q1\tp1", "q2\tp2\tn1\tn2", "q3\tp3\tn3\r"])
    assert read_examples(path) == [
        Example("q1", "p1"), Example("q2", "p2", ("n1", "n2")), Example("q3", "p3", ("n3",)),
    ]


def test_tsv_with_header(tmp_path):
    header = "query\tpassage\tnegative_1\tnegative_2\tlabel\tquery_id\tpassage_id"
    rows = [f"{e.query}\t{e.passage}\t{e.negatives[0]}\t{e.negatives[-1]}\t{e.label}\t"
            f"{e.query_id}\t{e.passage_id}" for e in EXAMPLES]
    path = write(tmp_path / "d.tsv", [header] + rows)
    expected = [Example(e.query, e.passage, (e.negatives[0], e.negatives[-1]), e.label,
                        e.query_id, e.passage_id) for e in EXAMPLES]
    assert read_examples(path) == expected


def test_tsv_header_with_byte_order_mark(tmp_path):
    path = write(tmp_path / "d.tsv", [b"\xef\xbb\xbfQuery\tPassage\tLabel\n", "q\tp\t3"])
    assert read_examples(path) == [Example("q", "p", label=3.0)]


def make_beir(folder):
    os.makedirs(folder / "qrels")
    write(folder / "corpus.jsonl", [
        '{"_id": "d1", "title": "Title one", "text": "first document"}',
        '{"_id": "d2", "title": "", "text": "second document"}',
        '{"_id": "d3", "text": "third document"}',
    ])
    write(folder / "queries.jsonl", ['{"_id": "1", "text": "query one"}',
                                     '{"_id": "2", "text": "query two"}'])
    write(folder / "qrels" / "train.tsv",
          ["query-id\tcorpus-id\tscore", "1\td1\t1", "1\td2\t0", "2\td3\t2", "2\td1\t1"])
    write(folder / "qrels" / "test.tsv", ["query-id\tcorpus-id\tscore", "2\td2\t1"])
    return folder


def test_beir_folder(tmp_path):
    folder = make_beir(tmp_path / "beir")
    assert read_examples(str(folder)) == [
        Example("query one", "Title one first document", label=1.0, query_id="1", passage_id="d1"),
        Example("query two", "third document", label=2.0, query_id="2", passage_id="d3"),
        Example("query two", "Title one first document", label=1.0, query_id="2", passage_id="d1"),
    ]
    assert read_examples(str(folder), split="test") == [
        Example("query two", "second document", label=1.0, query_id="2", passage_id="d2")]
    with pytest.raises(FileNotFoundError, match="qrels/dev.tsv"):
        read_examples(str(folder), split="dev")


def test_globs_expand_sorted_and_mix_with_paths(tmp_path):
    for name in ("b", "a", "c"):
        write(tmp_path / f"{name}.jsonl", [json.dumps({"query": name, "passage": "p"})])
    write(tmp_path / "z.tsv", ["tsv\tp"])
    examples = read_examples([str(tmp_path / "*.jsonl"), str(tmp_path / "z.tsv")])
    assert [e.query for e in examples] == ["a", "b", "c", "tsv"]
    assert [e.query for e in read_examples(tmp_path / "[ab].jsonl")] == ["a", "b"]


@pytest.mark.parametrize("path", ["nothing*.jsonl", "missing.jsonl"])
def test_missing_paths_are_named(tmp_path, path):
    with pytest.raises(FileNotFoundError, match=path.replace("*", r"\*")):
        read_examples(str(tmp_path / path))


GOOD_JSON = '{"query": "q", "passage": "p"}'
# (file name, bad line, field named in the error or None, words in the error)
BAD_LINES = [
    ("d.jsonl", '{"query": "", "passage": "p"}', "query", "empty"),
    ("d.jsonl", '{"query": "q", "passage": "  "}', "passage", "empty"),
    ("d.jsonl", '{"query": "q"}', "passage", "missing"),
    ("d.jsonl", '{"passage": "p"}', "query", "missing"),
    ("d.jsonl", '{"query": "q", "passage": 3}', "passage", "string"),
    ("d.jsonl", '{"query": "q", "passage": "p",}', None, "invalid JSON"),
    ("d.jsonl", '["q", "p"]', None, "JSON object"),
    ("d.jsonl", '{"query": "q", "passage": "p", "label": "high"}', "label", "number"),
    ("d.jsonl", '{"query": "q", "passage": "p", "label": true}', "label", "number"),
    ("d.jsonl", '{"query": "q", "passage": "p", "negatives": "n"}', "negatives", "list"),
    ("d.jsonl", '{"query": "q", "passage": "p", "negatives": ["n", 1]}', "negatives[1]",
     "string"),
    ("d.jsonl", '{"query": "q", "passage": "p", "query_id": [1]}', "query_id", "string"),
    ("d.jsonl", b'{"query": "caf\xe9", "passage": "p"}\n', None, "UTF-8"),
    ("d.tsv", "only one column", None, "2 tab-separated columns"),
    ("d.tsv", "\tp", "query", "empty"),
    ("d.tsv", "q\tp\t", "negative 1", "empty"),
    ("d.tsv", b"q\tcaf\xe9\n", None, "UTF-8"),
]


@pytest.mark.parametrize("name,bad,field,problem", BAD_LINES)
def test_bad_line_error_names_file_line_and_field(tmp_path, name, bad, field, problem):
    good = GOOD_JSON if name.endswith(".jsonl") else "q\tp"
    path = write(tmp_path / name, [good, "", bad, good])  # the bad line is line 3
    with pytest.raises(DataError) as raised:
        read_examples(path)
    message = str(raised.value)
    assert message.startswith(f"{path}:3:"), message
    assert problem in message
    assert raised.value.line == 3 and raised.value.field == field
    if field:
        assert f"'{field}'" in message


@pytest.mark.parametrize("name,bad,field,problem", BAD_LINES)
def test_bad_line_skip_counts_and_logs(tmp_path, caplog, name, bad, field, problem):
    good = GOOD_JSON if name.endswith(".jsonl") else "q\tp"
    path = write(tmp_path / name, [good, bad, good, bad])
    stats = ReadStats()
    with caplog.at_level(logging.WARNING, logger="samtone.data.files"):
        examples = read_examples(path, on_bad_line="skip", stats=stats)
    assert examples == [Example("q", "p")] * 2
    assert stats.skipped == {path: 2} and stats.examples == {path: 2}
    assert stats.total_skipped == 2 and stats.total_examples == 2
    assert f"{path}: skipped 2 bad line(s)" in caplog.text
    assert f"{path}:2:" in caplog.text  # the first bad line, for the user to look at


@pytest.mark.parametrize("header,problem", [
    ("query\tpassage\tscore", "'score' is not a known header column"),
    ("query\tnegative", "'passage' is missing from the header"),
    ("query\tpassage\tlabel\tlabel", "'label' appears twice"),
])
def test_bad_tsv_header(tmp_path, header, problem):
    path = write(tmp_path / "d.tsv", [header, "q\tp\t1"])
    with pytest.raises(DataError, match=problem) as raised:
        read_examples(path)
    assert str(raised.value).startswith(f"{path}:1:")


def test_tsv_with_header_checks_column_count_and_label(tmp_path):
    path = write(tmp_path / "d.tsv", ["query\tpassage\tlabel", "q\tp\t1", "q\tp", "q\tp\tx"])
    with pytest.raises(DataError, match=r":3: expected 3 tab-separated columns"):
        read_examples(path)
    stats = ReadStats()
    assert read_examples(path, on_bad_line="skip", stats=stats) == [Example("q", "p", label=1.0)]
    assert stats.skipped == {path: 2}


@pytest.mark.parametrize("qrel,field", [("3\td1\t1", "query-id"), ("1\td9\t1", "corpus-id"),
                                        ("1\td1", None), ("1\td1\tyes", "score")])
def test_bad_beir_qrel(tmp_path, qrel, field):
    folder = make_beir(tmp_path / "beir")
    qrels = write(folder / "qrels" / "train.tsv", ["query-id\tcorpus-id\tscore", "1\td1\t1", qrel])
    with pytest.raises(DataError) as raised:
        read_examples(str(folder))
    assert str(raised.value).startswith(f"{qrels}:3:") and raised.value.field == field


def test_bad_beir_corpus_line(tmp_path):
    folder = make_beir(tmp_path / "beir")
    corpus = write(folder / "corpus.jsonl", ['{"_id": "d1", "text": "x"}', '{"_id": "d2"}'])
    with pytest.raises(DataError, match="'text' is missing") as raised:
        read_examples(str(folder))
    assert str(raised.value).startswith(f"{corpus}:2:")


def test_read_sentences(tmp_path):
    path = write(tmp_path / "s.txt", ["first sentence", "", "  ", "second\ttab sentence"])
    assert read_sentences(path) == [Example("first sentence", "first sentence"),
                                    Example("second\ttab sentence", "second\ttab sentence")]
    bad = write(tmp_path / "bad.txt", ["ok", b"caf\xe9\n"])
    with pytest.raises(DataError, match=f"{bad}:2: is not valid UTF-8"):
        read_sentences(bad)
    stats = ReadStats()
    assert len(read_sentences(bad, on_bad_line="skip", stats=stats)) == 1
    assert stats.skipped == {bad: 1}


def test_unknown_extension_and_policy(tmp_path):
    path = write(tmp_path / "d.csv", ["q,p"])
    with pytest.raises(ValueError, match="unknown format"):
        read_examples(path)
    with pytest.raises(ValueError, match="on_bad_line"):
        read_examples(path, on_bad_line="ignore")


def test_gcs_without_tensorflow_says_so():
    try:
        import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
        pytest.skip("tensorflow is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="gs:// paths needs tensorflow"):
        read_examples("gs://bucket/data.jsonl")
