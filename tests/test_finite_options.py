"""Number options refuse inf and nan (float() takes both, and a range with only a
lower bound let them through): ``--timeout inf`` left queries to a silent upstream
holding their slots for ever, from the command line, the environment or the file."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from doqproxy.cli import main


@pytest.mark.parametrize("value", ["inf", "nan", "Infinity"])
def test_forward_timeout_must_be_finite(value: str) -> None:
    result = CliRunner().invoke(main, ["forward", "-u", "quic://127.0.0.1:9", "--timeout", value])
    assert result.exit_code == 2, result.output
    assert "is not a finite number" in result.output
    assert "Traceback" not in result.output


def test_the_environment_and_the_config_file_are_checked_too(tmp_path: Path) -> None:
    config = tmp_path / "doqproxy.toml"
    config.write_text('upstream = "quic://127.0.0.1:9"\ntimeout = inf\n')
    result = CliRunner().invoke(main, ["check-config", "--config", str(config)])
    assert result.exit_code != 0 and "finite" in result.output, result.output
    result = CliRunner().invoke(
        main,
        ["forward", "-u", "quic://127.0.0.1:9"],
        env={"DOQPROXY_TIMEOUT": "inf"},
    )
    assert result.exit_code == 2 and "finite" in result.output, result.output


def test_finite_values_still_pass(tmp_path: Path) -> None:
    config = tmp_path / "doqproxy.toml"
    config.write_text('upstream = "quic://127.0.0.1:9"\ntimeout = 2.5\n')
    result = CliRunner().invoke(main, ["check-config", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "timeout = 2.5" in result.output
