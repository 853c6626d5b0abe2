"""Logging is configured from Settings: `log_level` and `log_format`, read from ORCHESTRATOR_*
variables or an env file; the command line's `--log-level` overrides the level."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config import load_settings
from orchestrator.logs import JsonFormatter, configure_logging, request_context


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[logging.Logger]:
    """No ORCHESTRATOR_LOG_* from outside; the root and package loggers as they were after."""
    monkeypatch.delenv("ORCHESTRATOR_LOG_LEVEL", raising=False)
    monkeypatch.delenv("ORCHESTRATOR_LOG_FORMAT", raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    # an earlier test in this process (the bench) may have quietened the package's loggers
    ours = logging.getLogger("orchestrator")
    ours_level = ours.level
    ours.setLevel(logging.NOTSET)
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)
    ours.setLevel(ours_level)


def test_env_file_sets_json_format_and_level(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], clean: logging.Logger
) -> None:
    env_file = tmp_path / "orchestrator.env"
    env_file.write_text("ORCHESTRATOR_LOG_FORMAT=json\nORCHESTRATOR_LOG_LEVEL=WARNING\n")
    configure_logging(load_settings(env_file))
    assert clean.level == logging.WARNING
    log = logging.getLogger("orchestrator.test")
    log.info("below the level")
    with request_context("r-1"):
        log.warning("shown %d", 7)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    record = json.loads(lines[0])
    assert record["level"] == "WARNING"
    assert record["logger"] == "orchestrator.test"
    assert record["message"] == "shown 7"
    assert record["request_id"] == "r-1"


def test_environment_sets_the_format_and_the_flag_overrides_the_level(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], clean: logging.Logger
) -> None:
    monkeypatch.setenv("ORCHESTRATOR_LOG_FORMAT", "json")
    monkeypatch.setenv("ORCHESTRATOR_LOG_LEVEL", "ERROR")
    configure_logging(load_settings(None), "DEBUG")
    assert clean.level == logging.DEBUG
    assert [type(h.formatter) for h in clean.handlers] == [JsonFormatter]
    logging.getLogger("orchestrator.test").debug("detail")
    assert json.loads(capsys.readouterr().err)["level"] == "DEBUG"


def test_text_is_the_default(capsys: pytest.CaptureFixture[str], clean: logging.Logger) -> None:
    configure_logging(load_settings(None))
    assert clean.level == logging.INFO
    logging.getLogger("orchestrator.test").info("plain")
    line = capsys.readouterr().err.strip()
    assert line.endswith(" INFO orchestrator.test plain"), line


def test_cli_names_a_missing_env_file_and_a_bad_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.env"
    assert main(["serve", "--env-file", str(missing)]) == 2
    assert f"--env-file {missing}: no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.env"
    bad.write_text("ORCHESTRATOR_LOG_FORMAT=xml\n")
    assert main(["serve", "--env-file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "invalid settings" in err and "log_format" in err and str(bad) in err
