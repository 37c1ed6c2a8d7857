"""Review: qh3 is a default dependency only where PyPI has a wheel for it (qh3 2.1.0:
abi3 wheels for Linux, macOS and Windows). Elsewhere pip would build it from source
(a Rust toolchain and clang), and ``pip install doqproxy`` would fail where aioquic
alone works. Checked with ``pip install --dry-run --only-binary=:all: --platform P``:
manylinux i686/armv7l, win32, win_arm64 and macOS arm64 have wheels; FreeBSD amd64
has none."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def _qh3() -> Requirement:
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    [requirement] = [Requirement(text) for text in dependencies if text.startswith("qh3")]
    return requirement


def _wanted(sys_platform: str, machine: str, implementation: str = "CPython") -> bool:
    marker = _qh3().marker
    assert marker is not None
    return marker.evaluate(
        {
            "sys_platform": sys_platform,
            "platform_machine": machine,
            "platform_python_implementation": implementation,
        }
    )


@pytest.mark.parametrize(
    ("sys_platform", "machine"),
    [
        ("linux", "x86_64"),
        ("linux", "aarch64"),
        ("linux", "armv7l"),
        ("linux", "i686"),
        ("darwin", "x86_64"),
        ("darwin", "arm64"),
        ("win32", "AMD64"),
        ("win32", "ARM64"),
        ("win32", "x86"),
    ],
)
def test_qh3_is_a_dependency_where_it_has_wheels(sys_platform: str, machine: str) -> None:
    assert _wanted(sys_platform, machine)


@pytest.mark.parametrize(
    ("sys_platform", "machine"),
    [
        ("freebsd14", "amd64"),  # OPNsense, pfSense: FreeBSD says amd64, as Windows AMD64
        ("freebsd14", "arm64"),
        ("openbsd7", "amd64"),
        ("linux", ""),  # platform.machine() unknown: '' is in every string
        ("linux", "x86"),  # a substring of the list, not a Linux machine name
        ("linux", "ppc64le"),
    ],
)
def test_qh3_is_not_asked_for_where_pip_would_build_it(sys_platform: str, machine: str) -> None:
    assert not _wanted(sys_platform, machine)


def test_not_on_pypy() -> None:
    assert not _wanted("linux", "x86_64", "PyPy")
