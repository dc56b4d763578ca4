"""User mistakes end in one `error:` line naming the file, line, flag or binding at fault.

Library calls prove the messages (a UserError's text is what samtone.cli.common prints, so a
message without a newline is one line); three samtone-plan runs prove the exit statuses.
"""
import json
import re

import gin
import jax
import numpy as np
import pytest

from samtone import grad_cache
from samtone.cli import gin_parsing
from samtone.cli import gin_registry  # noqa: F401  (registers the Gin names)
from samtone.data import pipeline, smoke_path
from samtone.errors import ConfigError, DataError

from tiny_runs import run_command

QUICK_PLAN = ["--gin_file=configs/smoke.gin", "--gin.BATCH_SIZE=8", "--gin.QUERY_LENGTH=8",
              "--gin.PASSAGE_LENGTH=16"]


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def config_error(gin_files, bindings=()) -> str:
    with pytest.raises(ConfigError) as raised:
        gin_parsing.parse(gin_files, bindings)
    return one_line(raised.value)


def one_line(error: Exception) -> str:
    message = str(error)
    assert "\n" not in message, message
    return message


def assert_one_error_line(result, *expected: str) -> str:
    """The command exited with 2, and its stderr ends in its only `error:` line."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-3000:]
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


# ---------------------------------------------------------------------------------------------
# 1, 2. Gin syntax: files name file and line, command-line bindings name their flag.


@pytest.mark.parametrize("included, line, problem", [
    # The '(' left open at the end of an included file: Gin's tokenizer raises TokenError,
    # which names neither the file nor the line.
    ("BATCH_SIZE = 8\nTRAIN_STEPS = (20\n", 3, "unclosed '('"),
    # A binding follows the '(': Gin blames that line; the message points back to the '('.
    ("TRAIN_STEPS = (20\nBATCH_SIZE = 8\n", 3, "the '(' opened on line 2 is never closed"),
])
def test_gin_file_syntax_error_names_the_file_and_line(tmp_path, clean_gin, included, line,
                                                       problem):
    included_path = tmp_path / "inc.gin"
    included_path.write_text("include 'configs/smoke.gin'\n" + included)
    (tmp_path / "run.gin").write_text(f"include '{included_path}'\nQUERY_LENGTH = 8\n")
    message = config_error([str(tmp_path / "run.gin")])
    assert message.startswith(f"{included_path}:{line}: ") and problem in message, message


def test_gin_flag_syntax_error_names_the_flag(clean_gin):
    message = config_error(["configs/smoke.gin"], ["TRAIN_STEPS = (20"])
    assert message.startswith("--gin.TRAIN_STEPS=(20: unclosed '('"), message


@pytest.mark.parametrize("value", ["/tmp/x", "pairs.jsonl"])  # Gin words their errors apart
def test_unquoted_string_flag_says_how_to_quote(clean_gin, value):
    message = config_error(["configs/smoke.gin"], [f"MODEL_DIR = {value}"])
    assert message.startswith(f"--gin.MODEL_DIR={value}: "), message
    assert f"inner quotes: --gin.MODEL_DIR=\"'{value}'\"" in message


def test_unquoted_string_in_a_file_names_the_file_and_line(tmp_path, clean_gin):
    path = tmp_path / "run.gin"
    path.write_text("include 'configs/smoke.gin'\n\nMODEL_DIR = /tmp/x\n")
    message = config_error([str(path)])
    assert message.startswith(f"{path}:3: ") and "MODEL_DIR = '/tmp/x'" in message, message


def test_unquoted_string_from_the_command_line():
    result = run_command("plan", *QUICK_PLAN, "--devices=1", "--gin.MODEL_DIR=/tmp/x")
    assert_one_error_line(result, "--gin.MODEL_DIR=/tmp/x", "--gin.MODEL_DIR=\"'/tmp/x'\"")


# ---------------------------------------------------------------------------------------------
# 3, 4. Data: a batch larger than the data; too few hard negatives.


def write_pairs(path, negatives_per_line=()):
    lines = [{"query": f"question {i}", "passage": f"answer {i}"} for i in range(5)]
    for line, count in enumerate(negatives_per_line):
        lines[line]["negatives"] = [f"wrong {line}.{k}" for k in range(count)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def batch_iterator(data, **settings):
    settings = {"global_batch_size": 4, "process_index": 0, "process_count": 1, "prefetch": 0,
                **settings}
    return pipeline.make_batch_iterator(str(data), tokenizer=smoke_path("spm.model"),
                                        query_length=8, passage_length=8, **settings)


def test_batch_larger_than_the_data(tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    with pytest.raises(ConfigError) as raised:
        batch_iterator(data, global_batch_size=16)
    assert one_line(raised.value).startswith(
        f"BATCH_SIZE (train.global_batch_size) = 16 is larger than the 5 examples of {data}")


@pytest.mark.parametrize("negatives_per_line, line, problem", [
    ((), 1, "field 'negatives' is missing: make_batch_iterator.num_negatives = 4 needs 4"),
    ((4, 1), 2, "field 'negatives' has only 1, but make_batch_iterator.num_negatives = 4"),
])
def test_too_few_negatives_name_the_file_and_line(tmp_path, negatives_per_line, line, problem):
    data = write_pairs(tmp_path / "pairs.jsonl", negatives_per_line)
    with pytest.raises(DataError) as raised:
        batch_iterator(data, num_negatives=4)
    assert one_line(raised.value).startswith(f"{data}:{line}: {problem}"), raised.value


# ---------------------------------------------------------------------------------------------
# 5. samtone-plan: a plan that does not fit exits with 1, after printing it.


def test_plan_that_does_not_fit_exits_with_1():
    result = run_command("plan", *QUICK_PLAN, "--devices=1", "--device_memory_gib=0.0001")
    assert result.returncode == 1, result.stderr[-3000:]
    assert re.search(r"total .* of 0.0001 GiB: DOES NOT FIT", result.stdout), result.stdout
    assert "error:" not in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# 6. A batch the devices cannot split names BATCH_SIZE and the devices, not microbatches.


def test_batch_that_does_not_split_over_the_devices():
    with pytest.raises(ConfigError) as raised:
        grad_cache.check_microbatches(1, 63, 2)
    assert one_line(raised.value) == ("BATCH_SIZE (train.global_batch_size) = 63 does not "
                                      "split over the 2 data-parallel devices; use a multiple "
                                      "of 2")


def test_microbatches_named_only_when_they_fail():
    grad_cache.check_microbatches(4, 64, 2)
    with pytest.raises(ConfigError) as raised:
        grad_cache.check_microbatches(3, 64, 2)
    assert one_line(raised.value).startswith("train.microbatches = 3 does not split")


def test_plan_on_devices_that_cannot_split_the_batch():
    result = run_command("plan", "--gin_file=configs/smoke.gin", "--devices=3")
    message = assert_one_error_line(result, "BATCH_SIZE (train.global_batch_size) = 64",
                                    "the 3 data-parallel devices")
    assert "microbatches" not in message


# 7. Hosts that read different TRAIN_DATA are stopped before the first step.
class _FakeIterator:
    def __init__(self, fingerprint):
        self.fingerprint = fingerprint

    def get_state(self):
        return {"epoch": 0, "data_fingerprint": self.fingerprint}


def test_hosts_with_different_data_are_refused(monkeypatch):
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    from samtone import train as train_lib  # pylint: disable=import-outside-toplevel

    import hashlib  # pylint: disable=import-outside-toplevel

    def digest(fingerprint):
        return np.frombuffer(hashlib.sha256(fingerprint.encode()).digest(), np.uint8)

    hosts = ["abc", "abc", "abc"]  # what each of 3 processes read
    monkeypatch.setattr(jax, "process_count", lambda: len(hosts))
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda value: np.stack([digest(h) for h in hosts]))
    train_lib._check_same_data(_FakeIterator("abc"), "pairs.jsonl")
    hosts[2] = "abd"
    # Process 0 stops too (it would wait for the others in the first collective).
    with pytest.raises(ConfigError, match="'pairs.jsonl' differs between hosts: "
                                        "process 2 read other data than process 0 "
                                        r"\(this is process 0") as raised:
        train_lib._check_same_data(_FakeIterator("abc"), "pairs.jsonl")
    assert raised.value.parameter == "DataConfig.train_data"
