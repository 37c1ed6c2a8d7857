"""Sample a running process with py-spy and say what dominates its CPU time."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .procs import BenchError

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::\d+)?\)$")
PACKAGES = (
    ("/aioquic/", "aioquic"),
    ("/doqproxy/", "doqproxy"),
    ("/dns/", "dnspython"),
    ("/cryptography/", "cryptography"),
    ("/asyncio/runners.py", "event loop (C: uvloop, syscalls)"),
    ("/asyncio/", "asyncio"),
    ("uvloop", "uvloop"),
)

# Frames on every stack (start-up and the event loop's entry): not worth listing.
ENTRY_FRAMES = ("doqproxy/__main__.py", "doqproxy/cli/", "doqproxy/runtime.py")


def py_spy(log: list[str], install: bool = True) -> str | None:
    """The py-spy executable next to this Python, installed with pip when missing."""
    path = Path(sys.executable).parent / "py-spy"
    if path.exists():
        return str(path)
    if install:
        log.append("installing py-spy with pip")
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "py-spy"],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode == 0 and path.exists():
            return str(path)
        log.append(f"py-spy not installed: {done.stderr.strip()[-300:]}")
    return shutil.which("py-spy")


def start(executable: str, pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """Begin sampling ``pid`` (non-blocking, 200 Hz) for ``seconds``; collapsed stacks go to out."""
    argv = [executable, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds)))]
    argv += ["--rate", "200", "--nonblocking", "--format", "raw", "--output", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def package(file: str) -> str:
    for marker, name in PACKAGES:
        if marker in file:
            return name
    return "other"


@dataclass
class Profile:
    samples: int = 0
    self_time: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)
    by_package: Counter[str] = field(default_factory=Counter)
    self_lines: Counter[str] = field(default_factory=Counter)

    def share(self, count: int) -> float:
        return 100.0 * count / self.samples if self.samples else 0.0

    def summary(self, top: int = 12) -> dict[str, object]:
        return {
            "samples": self.samples,
            "self_by_package_pct": {
                name: round(self.share(count), 1) for name, count in self.by_package.most_common()
            },
            "top_self_pct": {
                name: round(self.share(count), 1) for name, count in self.self_time.most_common(top)
            },
            "top_self_lines_pct": {
                name: round(self.share(count), 1)
                for name, count in self.self_lines.most_common(top)
            },
            "top_doqproxy_inclusive_pct": {
                name: round(self.share(count), 1)
                for name, count in [
                    item
                    for item in self.inclusive.most_common()
                    if "doqproxy/" in item[0] and not any(e in item[0] for e in ENTRY_FRAMES)
                ][:top]
            },
        }


def label(frame: str) -> tuple[str, str]:
    """``func (path/to/file.py)`` with the site-packages prefix cut, and the file."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip(), ""
    path = match["file"]
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match['func']} ({path})", match["file"]


def parse(text: str) -> Profile:
    profile = Profile()
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [label(frame) for frame in stack.split(";") if frame.strip()]
        if not frames:
            continue
        profile.samples += count
        leaf, leaf_file = frames[-1]
        profile.self_time[leaf] += count
        profile.self_lines[stack.rsplit(";", 1)[-1].strip()] += count
        profile.by_package[package("/" + leaf_file)] += count
        for name in {name for name, _ in frames}:
            profile.inclusive[name] += count
    return profile


def finish(proc: subprocess.Popen[bytes], out: Path, top: int = 12) -> dict[str, object]:
    _, stderr = proc.communicate(timeout=60)
    if proc.returncode != 0 or not out.exists():
        raise BenchError(f"py-spy failed ({proc.returncode}): {stderr.decode()[-500:]}")
    return parse(out.read_text(errors="replace")).summary(top)
