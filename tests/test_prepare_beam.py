"""samtone-prepare on Apache Beam (DirectRunner): the folder of the local path, byte for byte;
bad lines named by file:line; nothing left half written; an existing output refused."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from samtone.data import prepare, prepare_beam, prepared
from samtone.errors import DataError, MissingDependencyError, OutputExistsError
import test_prepared
from test_prepared import sentence

# apache-beam needs protobuf<7, which the seqio extra's TensorFlow/sentencepiece code cannot
# load: CI runs this file in a venv of its own (README, Tests).
needs_beam = pytest.mark.skipif(
    importlib.util.find_spec("apache_beam") is None,
    reason="apache-beam is not installed: pip install 'samtone[beam]' (its own venv in CI)")

K, LQ, LP = 2, 8, 16
OPTIONS = ("--direct_num_workers=1", "--direct_running_mode=in_memory")
vocabulary = test_prepared.vocabulary  # the fixture: a SentencePiece model of the WORDS


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    """Two JSONL files and a TSV with a header: labels, passage ids, blank lines, negatives
    that are passages of examples in other files (they take those passages' ids)."""
    rng = np.random.default_rng(1)
    folder = tmp_path_factory.mktemp("data")
    passages = [sentence(rng, 2, 24) for _ in range(300)]

    def negatives(i):
        return [passages[(i + 101) % 300] if i % 3 == 0 else sentence(rng, 1, 20),
                sentence(rng, 1, 20), "extra"]

    paths = []
    for name, rows in (("a.jsonl", range(0, 120)), ("b.jsonl", range(120, 200))):
        lines = []
        for i in rows:
            record = {"query": f"{i} {sentence(rng, 0, 10)}", "passage": passages[i],
                      "negatives": negatives(i), "label": float(i % 4)}
            if i % 5 == 0:
                record["passage_id"] = f"doc{i}"
            lines.append(json.dumps(record) + ("\n\n" if i % 17 == 0 else "\n"))
        (folder / name).write_text("".join(lines))
        paths.append(str(folder / name))
    lines = ["query\tpassage\tnegative\tnegative\tlabel\tpassage_id\n"]
    for i in range(200, 300):
        lines.append("\t".join([f"{i} {sentence(rng, 0, 10)}", passages[i], *negatives(i)[:2],
                                str(i % 3), f"doc{i}"]) + "\n")
    (folder / "c.tsv").write_text("".join(lines))
    return paths + [str(folder / "c.tsv")]


def read_folder(folder):
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    with open(os.path.join(folder, prepared.MANIFEST), encoding="utf-8") as file:
        manifest = json.load(file)
    shards = []
    for shard in manifest["shards"]:
        source = ArrayRecordDataSource([os.path.join(folder, shard["file"])])
        shards.append(source.__getitems__(list(range(len(source)))))
    with open(os.path.join(folder, prepared.LENGTHS), "rb") as file:
        lengths = file.read()
    return manifest, shards, lengths


@needs_beam
@pytest.mark.parametrize("num_negatives", [K, 0], ids=["negatives", "pairs"])
def test_same_folder_as_the_local_path(data_files, vocabulary, tmp_path, num_negatives):
    settings = prepare.Settings(query_length=LQ, passage_length=LP, num_negatives=num_negatives)
    local, beamed = str(tmp_path / "local"), str(tmp_path / "beam")
    prepare.prepare(data_files, vocabulary, local, settings, shards=3, workers=1,
                    progress=False)
    # 2 KiB read items: every file is read by several workers.
    prepare_beam.prepare_with_beam(data_files, vocabulary, beamed, settings, shards=3,
                                   pipeline_options=OPTIONS, chunk_bytes=2048)
    expected, found = read_folder(local), read_folder(beamed)
    assert found[0] == expected[0]  # prepared.json, fingerprint included
    assert found[0]["num_examples"] == 300 and found[0]["has_labels"]
    assert [len(shard) for shard in found[1]] == [100, 100, 100]
    assert found[1] == expected[1]
    assert found[2] == expected[2]
    assert sorted(os.listdir(beamed)) == sorted(os.listdir(local))


@needs_beam
@pytest.mark.parametrize("on_bad_line", ["error", "skip"])
def test_bad_line_is_named(data_files, vocabulary, tmp_path, on_bad_line):
    text = open(data_files[1], encoding="utf-8").read().splitlines(keepends=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(text[:60]) + '{"query": "c"}\n' + "".join(text[60:]))
    line = 61
    settings = prepare.Settings(query_length=LQ, passage_length=LP, num_negatives=K)
    data = [data_files[0], str(bad)]
    output = tmp_path / "out"
    if on_bad_line == "error":
        with pytest.raises(DataError, match=f"^{bad}:{line}: field 'passage' is missing"):
            prepare_beam.prepare_with_beam(data, vocabulary, str(output), settings,
                                           pipeline_options=OPTIONS, chunk_bytes=1024)
        assert os.listdir(tmp_path) == ["bad.jsonl"]  # no output, no temporary folder
    else:
        manifest = prepare_beam.prepare_with_beam(
            data, vocabulary, str(output), settings, on_bad_line="skip",
            pipeline_options=OPTIONS, chunk_bytes=1024)
        local = prepare.prepare(data, vocabulary, str(tmp_path / "local"), settings,
                                on_bad_line="skip", workers=1, progress=False)
        assert manifest == local and manifest["skipped_lines"] == 1


@needs_beam
def test_interrupted_run_leaves_no_folder(data_files, vocabulary, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("worker lost")
    monkeypatch.setattr(prepare, "tokenize_rows", fail)
    settings = prepare.Settings(query_length=LQ, passage_length=LP)
    with pytest.raises(Exception, match="worker lost"):
        prepare_beam.prepare_with_beam(data_files[:1], vocabulary, str(tmp_path / "out"),
                                       settings, pipeline_options=OPTIONS)
    assert os.listdir(tmp_path) == []


@needs_beam
def test_existing_output_is_refused(data_files, vocabulary, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    settings = prepare.Settings(query_length=LQ, passage_length=LP)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        prepare_beam.prepare_with_beam(data_files[:1], vocabulary, str(output), settings,
                                       pipeline_options=OPTIONS)
    assert os.listdir(output) == ["keep.txt"]
    prepare_beam.prepare_with_beam(data_files[:1], vocabulary, str(output), settings,
                                   pipeline_options=OPTIONS, overwrite=True)
    assert prepared.read_manifest(str(output))["num_examples"] == 120


@needs_beam
def test_command(data_files, vocabulary, tmp_path):
    output = str(tmp_path / "pairs")
    flags = [f"--data={','.join(data_files)}", f"--vocabulary={vocabulary}",
             f"--query_length={LQ}", f"--passage_length={LP}", f"--num_negatives={K}",
             "--shards=3"]
    result = subprocess.run(
        [sys.executable, "-m", "samtone.cli.prepare", *flags, f"--output={output}",
         "--runner=DirectRunner", *[f"--beam_option={option}" for option in OPTIONS]],
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "300 examples in 3 shards" in result.stdout
    local = prepare.prepare(data_files, vocabulary, str(tmp_path / "local"),
                            prepare.Settings(LQ, LP, K), shards=3, workers=1, progress=False)
    assert prepared.read_manifest(output)["fingerprint"] == local["fingerprint"]


@pytest.mark.parametrize("bounds", [[0, 10000], [0, 3000, 4096, 9000, 10000],
                                    [0, 1, 8192, 8193, 10000]], ids=["one", "edges", "aligned"])
def test_fingerprint_is_the_same_whatever_the_shards(bounds):
    records = [str(i).encode() * (i % 7) for i in range(10000)]
    one = prepare.RecordDigests(0, len(records))
    for record in records:
        one.add(record)
    pieces = []
    for first, end in zip(bounds, bounds[1:]):
        shard = prepare.RecordDigests(first, len(records))
        for record in records[first:end]:
            shard.add(record)
        pieces.extend(shard.pieces())
    assert prepare.fingerprint(pieces[::-1]) == prepare.fingerprint(one.pieces())
    records[5000] = b"changed"
    other = prepare.RecordDigests(0, len(records))
    for record in records:
        other.add(record)
    assert prepare.fingerprint(other.pieces()) != prepare.fingerprint(one.pieces())


def test_missing_beam_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # import apache_beam fails
    with pytest.raises(MissingDependencyError, match=r"pip install 'samtone\[beam\]'"):
        prepare_beam.prepare_with_beam(str(tmp_path), "spm.model", str(tmp_path / "out"),
                                       prepare.Settings())
