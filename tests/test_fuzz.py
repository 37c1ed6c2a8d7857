"""The fuzz targets (fuzz/targets.py): saved crash inputs replayed, and a short atheris run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from fuzz.targets import TARGETS, seeds

REGRESSIONS = Path(__file__).resolve().parent / "fuzz_regressions"


def saved_inputs() -> list[tuple[str, Path]]:
    return sorted(
        (directory.name, path)
        for directory in REGRESSIONS.iterdir()
        if directory.is_dir()
        for path in directory.iterdir()
    )


@pytest.mark.parametrize(("target", "path"), saved_inputs(), ids=lambda v: getattr(v, "name", v))
def test_saved_crash_inputs_are_handled(target: str, path: Path) -> None:
    TARGETS[target](path.read_bytes())


@pytest.mark.parametrize("target", list(TARGETS))
def test_seeds_pass_their_target(target: str) -> None:
    for seed in seeds(target):
        TARGETS[target](seed)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason="atheris is not installed (test extra: CPython 3.11 on Linux x86_64 or aarch64)",
)
@pytest.mark.parametrize("target", list(TARGETS))
def test_short_fuzz_run(target: str) -> None:
    from fuzz.__main__ import run_target

    result = run_target(target, 3000 if target != "toml_config" else 1000)
    assert not result.crashed, result.tail
    assert result.runs >= 1000 and result.cov > 0, result.tail
