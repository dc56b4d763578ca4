"""samtone.train_config: each group checks its values once, naming the setting; checkpoints by
time as well as by steps."""
import pytest

from samtone import train_step as train_step_lib
from samtone.checkpoints import manager as checkpoint_lib
from samtone.errors import ConfigError
from samtone.models import dual_encoder, t5
from samtone.train_config import CheckpointConfig, DataConfig, EvalConfig
from tiny_runs import train_in_process


@pytest.mark.parametrize("make,parameter,message", [
    (lambda: DataConfig("x.jsonl", "spm.model", query_length=1), "DataConfig.query_length",
     "must be an integer >= 2, got 1"),
    (lambda: DataConfig("x.jsonl", "spm.model", passage_length=64.0),
     "DataConfig.passage_length", "got 64.0"),
    (lambda: CheckpointConfig(every_steps=0), "CheckpointConfig.every_steps",
     "must be a positive integer, got 0"),
    (lambda: CheckpointConfig(keep=True), "CheckpointConfig.keep", "or None, got True"),
    (lambda: CheckpointConfig(every_minutes=0), "CheckpointConfig.every_minutes",
     "positive number of minutes or None, got 0"),
    (lambda: CheckpointConfig(every_minutes="30"), "CheckpointConfig.every_minutes", "'30'"),
    (lambda: EvalConfig(every_steps=-5), "EvalConfig.every_steps", "got -5"),
    (lambda: EvalConfig(batch_size=0), "EvalConfig.batch_size", "got 0"),
])
def test_a_bad_value_is_refused_naming_its_setting(make, parameter, message):
    with pytest.raises(ConfigError, match=message) as raised:
        make()
    assert raised.value.parameter == parameter
    assert str(raised.value).startswith(parameter)


def test_good_values_and_none_are_accepted():
    assert CheckpointConfig(every_minutes=0.5, keep=None).every_minutes == 0.5
    assert EvalConfig(every_steps=None).every_steps is None
    assert DataConfig(["a.jsonl", "b.jsonl"], "spm.model", 2, 2).query_length == 2


def _model():
    config = t5.t5_1_1_config("tiny", vocab_size=1000, dropout_rate=0.0)
    return dual_encoder.DualEncoder(config, architecture="ade_spl", projection_dim=16)


@pytest.mark.slow
def test_checkpoints_by_time_are_written_at_log_steps(tmp_path, monkeypatch):
    """every_minutes due at each check: a checkpoint at each log step (2, 4) although
    every_steps is far away (without it only the final step 6 would be saved). The model's
    init is built twice: one abstract trace (optimiser, shardings) and the real init."""
    init_fn, built = train_step_lib._init_fn, []
    monkeypatch.setattr(train_step_lib, "_init_fn",
                        lambda *args: built.append(1) or init_fn(*args))
    timed = train_in_process(tmp_path / "timed", model=_model(), steps=6, log_every=2,
                             checkpoints={"every_steps": 1000, "every_minutes": 1e-9})
    assert timed.step == 6
    assert len(built) == 2
    assert checkpoint_lib.checkpoint_steps(tmp_path / "timed" / "checkpoints") == [2, 4, 6]
