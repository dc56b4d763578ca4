"""Commands never replace an output without --overwrite, never write over or into their own
inputs, and check both (and their other flags) before any work: each refusal is one `error:`
line, exit status 2, and every file involved is left byte for byte as it was. Writes are
atomic: an interrupted command leaves the previous output and no temporary.

Most checks fail before a model is loaded, which is what keeps these subprocesses short."""
import hashlib
import json
import os
import signal
import time

import numpy as np
import pytest

from samtone import mine, output_folder
from samtone.data import smoke_path
from samtone.export import saved_model
from tiny_runs import run_command, train_tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """150 held-out pairs: a corpus deeper than the 100 the metrics read."""
    with open(smoke_path("eval.jsonl"), encoding="utf-8") as f:
        lines = [next(f) for _ in range(150)]
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(lines))
    return path


def _hashes(*roots):
    """sha256 of every file under each root (a folder or a file), by path."""
    found = {}
    for root in map(str, roots):
        paths = [root] if os.path.isfile(root) else [
            os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names]
        for path in paths:
            with open(path, "rb") as f:
                found[path] = hashlib.sha256(f.read()).hexdigest()
    return found


def _assert_refused(result, *needles):
    """Exit 2 and stderr exactly one `error:` line holding every needle."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: "), lines[0]
    for needle in map(str, needles):
        assert needle in lines[0], (needle, lines[0])


def _mine(run, *args):
    return run_command("mine", f"--model_dir={run}", "--k=2", *args)


# --- 1. samtone-mine: --overwrite, never its training file, atomic ---------------------------


@pytest.mark.slow
def test_mine_refuses_an_existing_output(run, pairs, tmp_path):
    output = tmp_path / "mined.jsonl"
    output.write_text("an earlier mining\n")
    before = _hashes(output, pairs)
    _assert_refused(_mine(run, f"--train_data={pairs}", f"--output={output}"),
                    f"--output={output} exists", "--overwrite")
    assert _hashes(output, pairs) == before


@pytest.mark.parametrize("flag", ["--train_data", "--corpus"])
@pytest.mark.slow
def test_mine_never_replaces_an_input(run, pairs, tmp_path, flag):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a passage\nanother\n")
    inputs = {"--train_data": pairs, "--corpus": corpus}
    before = _hashes(pairs, corpus)
    result = _mine(run, f"--train_data={pairs}", f"--corpus={corpus}",
                   f"--output={inputs[flag]}", "--overwrite")
    _assert_refused(result, f"--output={inputs[flag]} is the input {flag}={inputs[flag]}")
    assert _hashes(pairs, corpus) == before


class _CharacterEncoders:
    """Stands in for a trained Encoder: each text embedded by its letter counts."""

    @staticmethod
    def _embed(texts):
        counts = np.zeros((len(texts), 26), np.float32)
        for row, text in enumerate(texts):
            for letter in text.lower():
                if "a" <= letter <= "z":
                    counts[row, ord(letter) - ord("a")] += 1
        return counts + 1e-3

    def passage_chunks(self, texts, progress=None):
        yield self._embed(texts)

    def encode_queries(self, texts, progress=None):
        return self._embed(texts)


def test_an_interrupted_mine_leaves_the_previous_output_and_no_temporary(pairs, tmp_path,
                                                                        monkeypatch):
    output = tmp_path / "mined.jsonl"
    output.write_text("an earlier mining\n")
    records = []

    def interrupt_at_the_third(example, negatives):
        records.append(example)
        if len(records) == 3:
            raise KeyboardInterrupt
        return {"query": example.query}

    monkeypatch.setattr(mine, "_record", interrupt_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        mine.mine_training_file("unused", str(pairs), str(output), k=2, overwrite=True,
                                encoders=_CharacterEncoders())
    assert os.listdir(tmp_path) == ["mined.jsonl"]
    assert output.read_text() == "an earlier mining\n"


# --- 2. samtone-export: never the run --------------------------------------------------------


@pytest.mark.parametrize("target", ["run", "parent"])
@pytest.mark.slow
def test_export_never_replaces_the_run_or_its_parent(run, target):
    notes = run.parent / "notes.txt"  # a sibling of the run, deleted with the parent
    notes.write_text("what this run was for\n")
    output = run if target == "run" else run.parent
    before = _hashes(run.parent)
    result = run_command("export", f"--model_dir={run}", f"--output={output}", "--overwrite",
                         "--platforms=cpu")
    _assert_refused(result, f"--output={output}", f"--model_dir={run}")
    assert _hashes(run.parent) == before


@pytest.mark.slow
def test_export_never_writes_into_the_runs_checkpoints(run, tmp_path):
    output = run / "checkpoints" / "export"
    before = _hashes(run)
    result = run_command("export", f"--model_dir={run}", f"--output={output}",
                         "--platforms=cpu")
    _assert_refused(result, f"--output={output} lies in {run / 'checkpoints'}")
    assert _hashes(run) == before and not output.exists()


def test_convert_never_replaces_its_source(tmp_path):
    source = tmp_path / "t5"
    source.mkdir()
    (source / "config.json").write_text("{}")
    before = _hashes(tmp_path)
    result = run_command("convert", f"--from={source}", f"--output={tmp_path}", "--overwrite")
    _assert_refused(result, f"--output={tmp_path} contains the input --from={source}")
    assert _hashes(tmp_path) == before


# --- 3. samtone-eval and samtone-analyze: --overwrite ----------------------------------------


@pytest.mark.slow
def test_eval_refuses_an_existing_metrics_file(run, pairs, tmp_path):
    (tmp_path / "metrics.json").write_text("{}\n")
    before = _hashes(tmp_path, run)
    result = run_command("eval", f"--model_dir={run}", f"--data={pairs}",
                         f"--output={tmp_path}")
    _assert_refused(result, f"--output={tmp_path} already holds metrics.json", "--overwrite")
    assert _hashes(tmp_path, run) == before


@pytest.mark.slow
def test_a_second_eval_into_the_default_output_is_refused(run, tmp_path):
    data = tmp_path / "earlier.jsonl"
    data.write_text(open(smoke_path("eval.jsonl"), encoding="utf-8").readline() * 2)
    default = run / "eval" / "earlier"  # MODEL_DIR/eval/<data name>
    default.mkdir(parents=True)
    try:
        (default / "metrics.json").write_text("{}\n")
        before = _hashes(run)
        result = run_command("eval", f"--model_dir={run}", f"--data={data}")
        _assert_refused(result, f"--output={default} already holds metrics.json",
                        "--overwrite", "another --output")
        assert _hashes(run) == before
    finally:
        (default / "metrics.json").unlink()
        default.rmdir()


@pytest.mark.slow
def test_analyze_refuses_an_existing_summary(run, pairs, tmp_path):
    (tmp_path / "summary.json").write_text("{}\n")
    before = _hashes(tmp_path, run)
    result = run_command("analyze", f"--model_dir={run}", f"--data={pairs}",
                         f"--output={tmp_path}")
    _assert_refused(result, f"--output={tmp_path} already holds summary.json",
                    "--overwrite")
    assert _hashes(tmp_path, run) == before


def test_an_interrupted_write_of_named_files_leaves_the_previous_ones(tmp_path):
    (tmp_path / "metrics.json").write_text("earlier\n")
    with pytest.raises(KeyboardInterrupt):
        with output_folder.write_files_atomically(tmp_path, ["run.trec", "metrics.json"],
                                                  overwrite=True) as temporary:
            (tmp_path.joinpath(temporary) / "run.trec").write_text("new\n")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["metrics.json"]
    assert (tmp_path / "metrics.json").read_text() == "earlier\n"
    with pytest.raises(KeyboardInterrupt):  # a folder it created goes too
        with output_folder.write_files_atomically(tmp_path / "new", ["a"], overwrite=False):
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["metrics.json"]


# --- 4. samtone-eval --output=<a file> --------------------------------------------------------


@pytest.mark.slow
def test_eval_output_that_is_a_file_is_refused_before_any_work(run, pairs, tmp_path):
    output = tmp_path / "metrics.json"
    output.write_text("not a folder\n")
    result = run_command("eval", f"--model_dir={run}", f"--data={pairs}", f"--output={output}")
    _assert_refused(result, f"--output={output} is a file, not a folder")
    assert output.read_text() == "not a folder\n"


# --- 5. samtone-analyze on one pair -----------------------------------------------------------


@pytest.mark.slow
def test_analyze_needs_two_pairs(run, tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text(open(smoke_path("eval.jsonl"), encoding="utf-8").readline())
    result = run_command("analyze", f"--model_dir={run}", f"--data={data}",
                         f"--output={tmp_path / 'out'}")
    _assert_refused(result, f"{data}: 1 pair", "at least 2 pairs")
    assert sorted(os.listdir(tmp_path)) == ["one.jsonl"]


# --- 6. --split without a BEIR folder ----------------------------------------------------------


@pytest.mark.parametrize("command, output_flag", [("eval", "--output"),
                                                  ("analyze", "--output")])
@pytest.mark.slow
def test_split_is_refused_for_a_pairs_file(run, pairs, tmp_path, command, output_flag):
    result = run_command(command, f"--model_dir={run}", f"--data={pairs}", "--split=dev",
                         f"{output_flag}={tmp_path / 'out'}")
    _assert_refused(result, "--split=dev applies only to a BEIR folder", f"--data={pairs}")


# --- 7. samtone-mine --margin < 0 --------------------------------------------------------------


@pytest.mark.slow
def test_mine_refuses_a_negative_margin(run, pairs, tmp_path):
    result = _mine(run, f"--train_data={pairs}", f"--output={tmp_path / 'mined.jsonl'}",
                   "--margin=-1")
    _assert_refused(result, "--margin=-1", ">= 0")
    assert not os.listdir(tmp_path)


# --- 8. a missing input names its flag ------------------------------------------------------------


@pytest.mark.parametrize("command, args, flag", [
    ("eval", ["--data={missing}"], "--data"),
    ("analyze", ["--data={missing}", "--output={out}"], "--data"),
    ("mine", ["--train_data={missing}", "--output={out}", "--k=2"], "--train_data"),
    ("mine", ["--train_data={pairs}", "--corpus={missing}", "--output={out}", "--k=2"],
     "--corpus"),
])
@pytest.mark.slow
def test_a_missing_data_file_is_named_with_its_flag(run, pairs, tmp_path, command, args, flag):
    missing = tmp_path / "nope.jsonl"
    args = [arg.format(missing=missing, pairs=pairs, out=tmp_path / "out") for arg in args]
    result = run_command(command, f"--model_dir={run}", *args)
    _assert_refused(result, f"{flag}={missing}: no such file")
    assert not os.listdir(tmp_path)


# --- 9. samtone-eval --top_k below the metrics' depth --------------------------------------------


@pytest.mark.slow
def test_eval_top_k_20_writes_20_per_query_and_the_full_depth_metrics(run, pairs, tmp_path):
    for top_k in (20, 100):
        result = run_command("eval", f"--model_dir={run}", f"--data={pairs}",
                             f"--output={tmp_path / str(top_k)}", f"--top_k={top_k}",
                             "--batch_size=32")
        assert result.returncode == 0, result.stderr[-3000:]
    per_query = {}
    for line in (tmp_path / "20" / "run.trec").read_text().splitlines():
        per_query[line.split()[0]] = per_query.get(line.split()[0], 0) + 1
    assert len(per_query) == 150 and set(per_query.values()) == {20}
    shallow, deep = (json.loads((tmp_path / k / "metrics.json").read_text())
                     for k in ("20", "100"))
    assert (shallow.pop("top_k"), deep.pop("top_k")) == (20, 100)
    assert shallow == deep  # metrics always read the top 100
    deep_lines = (tmp_path / "100" / "run.trec").read_text().splitlines()
    assert len(deep_lines) == 150 * 100


# --- 10. Ctrl-C during --format=saved_model ------------------------------------------------------


def _swallowed_ctrl_c(*args, **kwargs):
    """What jax2tf's `_is_tfval` does to a Ctrl-C that lands in it: a bare `except:`."""
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler runs here
    except:  # noqa: E722  pylint: disable=bare-except
        pass


@pytest.fixture
def python_ctrl_c():
    """SIGINT raises KeyboardInterrupt, as in a command's main thread (a test runner's worker
    may have another handler)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_that_tensorflow_swallows_still_interrupts(python_ctrl_c):
    with pytest.raises(KeyboardInterrupt):
        with saved_model.interrupts_kept():
            _swallowed_ctrl_c()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
def test_an_export_interrupted_inside_tensorflow_leaves_no_folder(tmp_path, monkeypatch,
                                                                  python_ctrl_c):
    tf = pytest.importorskip("tensorflow")
    pytest.importorskip("tensorflow_text")
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from samtone import export  # pylint: disable=import-outside-toplevel
    from samtone.models import dual_encoder, t5  # pylint: disable=import-outside-toplevel

    monkeypatch.setattr(tf.saved_model, "save", _swallowed_ctrl_c)
    model = dual_encoder.DualEncoder(t5.t5_1_1_config("tiny", vocab_size=1000), "sde",
                                     projection_dim=8)
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32),
                        jnp.ones((1, 8), jnp.int32))["params"]
    with pytest.raises(KeyboardInterrupt):
        export.write_export(tmp_path / "tf", model=model, params=params,
                            vocabulary=smoke_path("spm.model"), query_length=8,
                            passage_length=8, step=0, format="saved_model", platforms=("cpu",))
    assert os.listdir(tmp_path) == []
