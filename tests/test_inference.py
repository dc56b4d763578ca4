"""samtone.inference: a trained run's encoders against DualEncoder.apply on the checkpoint's
parameters, checkpoint steps, fixed-shape batching, serving without Gin or the optimisers, and
errors that name the problem."""
import subprocess
import sys

import numpy as np
import pytest

from samtone import export, inference
from samtone.checkpoints.manager import read_checkpoint
from samtone.data import smoke_path
from samtone.data.tokenizer import Tokenizer

from tiny_runs import PASSAGE_LENGTH, QUERY_LENGTH, smoke_model, smoke_texts, train_tiny_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("run"))


@pytest.mark.parametrize("step", [None, 1])
@pytest.mark.slow
def test_encodings_equal_the_model_applied_to_the_checkpoint(run, step):
    queries, passages = smoke_texts()
    # 8 fake devices here: the batch is split over them as in training.
    encoders = inference.Encoder.load(str(run), step=step, batch_size=8)
    state, _, restored_step = read_checkpoint(run / "checkpoints", step=step)
    assert encoders.step == restored_step == (step or 2)
    assert (encoders.query_length, encoders.passage_length) == (QUERY_LENGTH, PASSAGE_LENGTH)

    tokenizer = Tokenizer(smoke_path("spm.model"))
    for texts, method, length in ((queries, "encode_queries", QUERY_LENGTH),
                                  (passages, "encode_passages", PASSAGE_LENGTH)):
        expected = smoke_model().apply({"params": state["params"]},
                                       tokenizer.encode(texts, length), method=method)
        found = getattr(encoders, method)(texts)
        assert found.dtype == np.float32 and found.shape == (len(texts), 64)
        np.testing.assert_allclose(found, np.asarray(expected), atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(found, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_steps_are_different_checkpoints(run):
    queries, _ = smoke_texts(4)
    first = inference.Encoder.load(str(run), step=1, batch_size=8)
    last = inference.Encoder.load(str(run), batch_size=8)
    assert np.abs(first.encode_queries(queries) - last.encode_queries(queries)).max() > 1e-4


@pytest.mark.slow
def test_texts_go_through_in_batches_of_one_shape(run):
    queries, passages = smoke_texts(11)
    encoders = inference.Encoder.load(str(run), batch_size=8)
    all_at_once = encoders.encode_passages(passages)

    shapes = []
    query_encoder = encoders.query_encoder

    def recording(tokens):
        shapes.append(tokens.shape)
        return query_encoder(tokens)

    encoders.query_encoder = recording
    one_by_one = np.concatenate([encoders.encode_queries([q]) for q in queries[:3]])
    together = encoders.encode_queries(queries)  # 11 = 8 + 3 padded to 8
    assert set(shapes) == {(8, QUERY_LENGTH)} and len(shapes) == 5
    np.testing.assert_allclose(one_by_one, together[:3], atol=1e-6)
    np.testing.assert_allclose(encoders.encode_passages(passages[5:]), all_at_once[5:],
                               atol=1e-6)


@pytest.mark.slow
def test_errors_name_the_problem(run, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/model.json not found"):
        inference.Encoder.load(str(tmp_path))
    encoders = inference.Encoder.load(str(run), batch_size=8)
    with pytest.raises(TypeError, match="a list of texts"):
        encoders.encode_queries("one string")
    with pytest.raises(ValueError, match="divisible by the 8 devices"):
        inference.Encoder.load(str(run), batch_size=12)
    with pytest.raises(FileNotFoundError, match="samtone_export.json not found: not a "
                                                "samtone-export folder"):
        inference.load_exported(tmp_path)


_SERVING_ONLY = """
import sys
from samtone import inference
for path in sys.argv[1:]:
    encoder = inference.Encoder.load(path, batch_size=8)
    print(encoder.encode_queries(["what is samtone?"]).shape)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("gin", "optax", "torch",
                "tensorflow", "transformers", "sentence_transformers")
                or m.startswith(("samtone.optimizers", "samtone.cli", "samtone.train")))
print("loaded:", loaded)
"""


@pytest.mark.slow
def test_serving_loads_neither_gin_nor_the_optimisers(run, tmp_path):
    """Nor torch or TensorFlow: a run and a sentence-transformers export, loaded and used."""
    export.export_model(run, tmp_path / "st", format="sentence_transformers")
    result = subprocess.run([sys.executable, "-c", _SERVING_ONLY, str(run), str(tmp_path / "st")],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("(1, 64)") == 2
    assert "loaded: []" in result.stdout, result.stdout
