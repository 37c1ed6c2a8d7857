"""The data set and the plain-DNS peers: Debian tools, zone files, Unbound and dnsmasq."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .procs import LOOPBACK, BenchError

DOMAIN = "bench.test"
TTL = 86400
# dnsmasq-base is Debian's dnsmasq binary without the system daemon's service.
PACKAGES = {"dnsperf": "dnsperf", "unbound": "unbound", "dnsmasq": "dnsmasq-base"}
SBIN = ("/usr/sbin", "/sbin")


def which(tool: str) -> str | None:
    found = shutil.which(tool)
    if found:
        return found
    for directory in SBIN:
        path = os.path.join(directory, tool)
        if os.access(path, os.X_OK):
            return path
    return None


def missing_tools() -> list[str]:
    return [tool for tool in PACKAGES if which(tool) is None]


def install_tools(log: list[str]) -> None:
    """apt-get install the missing tools (once ``apt-get update``), or raise BenchError.

    While apt-get runs, a temporary policy-rc.d (when the system has none) keeps
    Debian from starting the packages' system services.
    """
    missing = missing_tools()
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BenchError(f"missing {', '.join(missing)}; install them (root and apt-get needed)")
    packages = [PACKAGES[tool] for tool in missing]
    log.append(f"installing {' '.join(packages)} with apt-get")
    policy = Path("/usr/sbin/policy-rc.d")
    own_policy = not policy.exists()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        if own_policy:
            policy.write_text("#!/bin/sh\n# doqproxy bench: start no services\nexit 101\n")
            policy.chmod(0o755)
        for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
            done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise BenchError(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    finally:
        if own_policy:
            policy.unlink(missing_ok=True)
    still = missing_tools()
    if still:
        raise BenchError(f"still missing after apt-get: {', '.join(still)}")


def hit_names(count: int) -> list[str]:
    return [f"n{i}.{DOMAIN}" for i in range(count)]


def memory_names(count: int) -> list[str]:
    return [f"m{i}.{DOMAIN}" for i in range(count)]


def address(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def write_zone(path: Path, hits: int, memory: int) -> None:
    """The zone ``doqproxy serve --zone`` answers from: n* and m* names, one A each."""
    lines = [
        f"$ORIGIN {DOMAIN}.",
        f"$TTL {TTL}",
        "@ IN SOA ns1 hostmaster 1 3600 600 86400 3600",
        "@ IN NS ns1",
        "ns1 IN A 127.0.0.1",
    ]
    lines += [f"n{i} IN A {address(i)}" for i in range(hits)]
    lines += [f"m{i} IN A {address(i + 1_000_000)}" for i in range(memory)]
    path.write_text("\n".join(lines) + "\n")


def write_queries(path: Path, names: list[str]) -> Path:
    path.write_text("".join(f"{name} A\n" for name in names))
    return path


def _unbound_common(directory: Path, port: int) -> list[str]:
    return [
        "server:",
        "  num-threads: 1",
        f"  interface: {LOOPBACK}",
        f"  port: {port}",
        "  do-ip6: no",
        "  do-tcp: yes",
        "  access-control: 127.0.0.0/8 allow",
        '  username: ""',
        '  chroot: ""',
        f'  directory: "{directory}"',
        '  pidfile: ""',
        "  use-syslog: no",
        '  logfile: ""',
        "  verbosity: 0",
        '  module-config: "iterator"',
        "  do-not-query-localhost: no",
        # Without this Unbound answers every *.test name NXDOMAIN from its built-in
        # RFC 6761 zone, which would fake the comparison.
        '  local-zone: "test." nodefault',
    ]


def write_unbound_backend(directory: Path, port: int, hits: int) -> Path:
    """Unbound answering the n* names authoritatively from local-data (the plain backend)."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = _unbound_common(directory, port)
    lines.append(f'  local-zone: "{DOMAIN}." static')
    lines += [f'  local-data: "n{i}.{DOMAIN}. {TTL} IN A {address(i)}"' for i in range(hits)]
    conf = directory / "unbound.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def write_unbound_peer(directory: Path, port: int, backend_port: int) -> Path:
    """Unbound as a caching forwarder to the plain backend, one thread."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = _unbound_common(directory, port)
    lines += [
        "  msg-cache-size: 64m",
        "  rrset-cache-size: 64m",
        "forward-zone:",
        f'  name: "{DOMAIN}."',
        f"  forward-addr: {LOOPBACK}@{backend_port}",
    ]
    conf = directory / "unbound.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def unbound_argv(conf: Path) -> list[str]:
    return [which("unbound") or "unbound", "-d", "-c", str(conf)]


def dnsmasq_argv(port: int, backend_port: int) -> list[str]:
    """dnsmasq forwarding to the plain backend with its cache on, no config files read."""
    return [
        which("dnsmasq") or "dnsmasq",
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        f"--port={port}",
        f"--listen-address={LOOPBACK}",
        "--bind-interfaces",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        f"--server={LOOPBACK}#{backend_port}",
        "--cache-size=10000",
        "--pid-file=",
        "--user=root",
    ]


def _first_line(argv: list[str], pattern: str) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    match = re.search(pattern, out.stdout + out.stderr)
    return match.group(1) if match else "?"


def versions() -> dict[str, str]:
    import aioquic

    found: dict[str, str] = {
        "python": platform.python_version(),
        "aioquic": aioquic.__version__,
    }
    try:
        import uvloop

        found["uvloop"] = str(getattr(uvloop, "__version__", "?"))
    except ImportError:
        found["uvloop"] = "not installed"
    found["unbound"] = _first_line([which("unbound") or "unbound", "-V"], r"Version (\S+)")
    found["dnsmasq"] = _first_line([which("dnsmasq") or "dnsmasq", "--version"], r"version (\S+)")
    found["dnsperf"] = _first_line([which("dnsperf") or "dnsperf", "-h"], r"Version (\S+)")
    git = subprocess.run(
        ["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    dirty = subprocess.run(
        ["git", "-C", str(Path(__file__).parent), "status", "--porcelain", "--", "../doqproxy"],
        capture_output=True,
        text=True,
        check=False,
    )
    found["doqproxy"] = (git.stdout.strip() or "?") + ("+dirty" if dirty.stdout.strip() else "")
    return found


def machine() -> dict[str, str | int]:
    """What the run ran on, with the load average (other work on the machine skews figures)."""
    model = "?"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count() or 0,
        "cpu": model,
        "kernel": platform.release(),
        "loadavg_at_start": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "executable": sys.executable,
    }
