"""The configuration file, DOQPROXY_* variables, precedence, check-config, and SIGHUP."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import dns.asyncquery
import dns.message
import dns.rcode
import pytest
from click.testing import CliRunner

from doqproxy.cli import main
from doqproxy.cli.config import parse
from doqproxy.cli.forward import forward

from .conftest import SERVER_NAME, Certs, ProxyProcess, free_port
from .doq_fixture import DoqTestUpstream


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("DOQPROXY_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(
    ("cli", "env", "expected"),
    [
        (["--timeout", "2"], "4.5", 2.0),  # command line beats everything
        ([], "4.5", 4.5),  # then the environment
        ([], None, 3.0),  # then the file
    ],
)
def test_precedence(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cli: list[str],
    env: str | None,
    expected: float,
) -> None:
    path = write(tmp_path / "c.toml", 'upstream = "quic://192.0.2.1"\ntimeout = 3\n')
    if env is not None:
        monkeypatch.setenv("DOQPROXY_TIMEOUT", env)
    settings, _ = parse(forward, ["--config", path, *cli])
    assert settings.timeout == expected


def test_defaults_and_upstream_table(tmp_path: Path, certs: Certs) -> None:
    path = write(
        tmp_path / "c.toml",
        f"""
listen = ["127.0.0.1:5300", "[::1]:5300"]
no-padding = true

[[upstream]]
url = "quic://192.0.2.1:8853"
tls-ca-file = "{certs.ca_file}"
tls-server-name = "{SERVER_NAME}"
""",
    )
    settings, _ = parse(forward, ["--config", path])
    assert [str(a) for a in settings.listen] == ["127.0.0.1:5300", "[::1]:5300"]
    (spec,) = settings.upstreams
    assert str(spec.url) == "quic://192.0.2.1:8853"
    assert spec.tls_ca_file == certs.ca_file
    assert spec.tls_server_name == SERVER_NAME
    assert settings.padding is False
    assert settings.timeout == 5.0  # the built-in default


def test_env_without_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOQPROXY_UPSTREAM", "quic://192.0.2.7")
    monkeypatch.setenv("DOQPROXY_LISTEN", "127.0.0.1:5301 127.0.0.1:5302")
    settings, _ = parse(forward, ["--config", "/dev/null"])
    assert [str(spec) for spec in settings.upstreams] == ["quic://192.0.2.7:853"]
    assert [a.port for a in settings.listen] == [5301, 5302]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("timout = 3\n", "unknown key 'timout'; did you mean 'timeout'?"),
        ('timeout = "soon"\n', "timeout must be a number, not a string ('soon')"),
        ("no-padding = 1\n", "no-padding must be true or false, not a integer (1)"),
        ('upstream = "quic://h"\ntimeout = 0.01\n', "timeout = 0.01: 0.01 is not in the range"),
        ("listen = [53]\n", "listen must be a list of strings"),
        ("upstream = [\n", "not valid TOML"),
        ('[[upstream]]\nhost = "a"\n', "[[upstream]] number 1: unknown key 'host'"),
        ('[[upstream]]\nurl = "quic://a"\n[[upstream]]\n', "number 2: needs url ="),
    ],
)
def test_file_errors_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "bad.toml", text)
    result = CliRunner().invoke(main, ["check-config", "--config", path])
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"Error: {path}: "), result.output
    assert message in result.output
    assert result.output.count("\n") == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('upstream = "quic://h:99999"\n', "the port is not a number from 0 to 65535"),
        ('upstream = "https://h"\n', "unknown scheme 'https', use quic://"),
        (
            'upstream = "quic://h"\ntls-ca-file = "/no/ca.pem"\n',
            "--tls-ca-file /no/ca.pem: no such",
        ),
        ('upstream = "quic://h"\nlisten = ["localhost:53"]\n', "is not an IP address"),
    ],
)
def test_bad_values_say_where_they_came_from(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "bad.toml", text)
    result = CliRunner().invoke(main, ["check-config", "--config", path])
    assert result.exit_code == 1
    assert message in result.output
    assert f" in {path})" in result.output
    assert result.output.count("\n") == 1


def test_missing_upstream_says_how(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "timeout = 2\n")
    result = CliRunner().invoke(main, ["check-config", "--config", path])
    assert result.exit_code == 1
    assert "missing --upstream" in result.output
    assert "DOQPROXY_UPSTREAM" in result.output and f"upstream in {path}" in result.output


def test_check_config_prints_effective_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "c.toml", 'upstream = "quic://192.0.2.1"\ntimeout = 3\n')
    monkeypatch.setenv("DOQPROXY_TCP_MAX_CONNECTIONS", "9")
    result = CliRunner().invoke(main, ["check-config", "--config", path])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert 'upstream = ["quic://192.0.2.1"]  # config file' in lines
    assert "timeout = 3.0  # config file" in lines
    assert "tcp-max-connections = 9  # DOQPROXY_TCP_MAX_CONNECTIONS" in lines
    assert 'listen = ["127.0.0.53:53"]  # default' in lines
    assert lines[-1] == "# configuration OK"


def test_example_file_documents_every_key(certs: Certs, tmp_path: Path) -> None:
    """contrib/doqproxy.toml.example mentions every key and, uncommented, is valid."""
    from doqproxy.cli.config import file_params

    example = Path(__file__).resolve().parent.parent / "contrib" / "doqproxy.toml.example"
    text = example.read_text()
    for key in file_params(forward):
        assert f"{key} =" in text, f"{key} is not documented in {example.name}"
    settings, _ = parse(forward, ["--config", str(example), "--tls-ca-file", certs.ca_file])
    assert all(spec.url.scheme == "quic" for spec in settings.upstreams)


async def _ask(port: int, name: str) -> str:
    query = dns.message.make_query(name, "A")
    response = await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=10)
    return str(response.answer[0][0]) if response.answer else dns.rcode.to_text(response.rcode())


async def test_sighup_reload(certs: Certs, tmp_path: Path) -> None:
    """A new upstream applies without dropping the listeners or the cache; a bad file is
    logged and the old configuration stays."""
    first = DoqTestUpstream(certs.cert_file, certs.key_file)
    second = DoqTestUpstream(certs.cert_file, certs.key_file)
    await first.start()
    await second.start()
    port = free_port()
    config = tmp_path / "doqproxy.toml"

    def configure(upstream: DoqTestUpstream, extra: str = "") -> None:
        config.write_text(
            f'listen = ["127.0.0.1:{port}"]\n'
            f'tls-ca-file = "{certs.ca_file}"\ntls-server-name = "{SERVER_NAME}"\n'
            f'upstream = "quic://127.0.0.1:{upstream.port}"\nstate-dir = "{tmp_path}/state"\n'
            "tcp-idle-timeout = 60.0\n" + extra
        )

    configure(first)
    proxy = ProxyProcess(["forward", "--config", str(config), "-v"], port, tmp_path / "p.log")
    try:
        await asyncio.to_thread(proxy.wait_ready)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await _ask(port, "a.test.") == "192.0.2.1"
        assert len(first.state.seen) == 1

        config.write_text("timeout = 'never'\n")
        proxy.proc.send_signal(signal.SIGHUP)
        await _wait_for_log(proxy, "reload failed, keeping the old configuration")
        assert "timeout must be a number" in proxy.stderr_path.read_text()
        assert await _ask(port, "n1.test.") == "192.0.2.11"
        assert len(first.state.seen) == 2

        configure(second)
        proxy.proc.send_signal(signal.SIGHUP)
        await _wait_for_log(proxy, "reload: done")
        assert await _ask(port, "n2.test.") == "192.0.2.12"
        assert [s.message.question[0].name.to_text() for s in second.state.seen] == ["n2.test."]
        # The cache survived: a.test. is answered without asking either upstream.
        assert await _ask(port, "a.test.") == "192.0.2.1"
        assert len(first.state.seen) == 2 and len(second.state.seen) == 1
        # The TCP listener (and a connection accepted before the reload) still work.
        wire = dns.message.make_query("n3.test.", "A").to_wire()
        writer.write(len(wire).to_bytes(2, "big") + wire)
        length = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 10), "big")
        response = dns.message.from_wire(await asyncio.wait_for(reader.readexactly(length), 10))
        assert str(response.answer[0][0]) == "192.0.2.13"
        writer.close()
        # Cache limits change in place, keeping what still fits.
        configure(second, "cache-size = 1\n")
        proxy.proc.send_signal(signal.SIGHUP)
        await _wait_for_log(proxy, "cache limits changed (1 entries kept)")
        assert await _ask(port, "n4.test.") == "192.0.2.14"
        assert proxy.stop() == 0
    finally:
        if proxy.proc.poll() is None:
            proxy.stop()
        await first.stop()
        await second.stop()


async def _wait_for_log(proxy: ProxyProcess, text: str) -> None:
    for _ in range(200):
        if text in proxy.stderr_path.read_text():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{text!r} not logged:\n{proxy.stderr_path.read_text()}")
