"""``doqproxy query`` end to end: a real subprocess against the aioquic test upstream."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from .conftest import SERVER_NAME, Certs, doqproxy_command
from .doq_fixture import DoqTestUpstream


async def run_query(
    port: int, certs: Certs, *args: str, ca_file: str | None = None
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *doqproxy_command(
            "query",
            *args,
            "-u",
            f"quic://127.0.0.1:{port}",
            "--tls-ca-file",
            ca_file or certs.ca_file,
            "--tls-server-name",
            SERVER_NAME,
        ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def query_json(port: int, certs: Certs, *args: str) -> dict[str, Any]:
    code, out, err = await run_query(port, certs, *args, "--json")
    assert code == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


async def test_text_output(upstream: DoqTestUpstream, certs: Certs) -> None:
    code, out, err = await run_query(upstream.port, certs, "a.test", "MX")
    assert code == 0, err
    assert "status: NOERROR" in out
    assert "a.test. 300 IN MX 10 mail.a.test." in out
    assert ";; TLS: TLSv1.3, TLS_" in out
    assert "ALPN doq" in out
    assert "resumed no" in out
    timing = next(line for line in out.splitlines() if line.startswith(";; TIMING"))
    for phase in ("connect", "handshake", "first byte", "total"):
        assert f"{phase} " in timing and " ms" in timing
    seen = upstream.state.seen[-1]
    assert seen.message.id == 0
    assert seen.message.question[0].to_text() == "a.test. IN MX"


async def test_json_output_and_nxdomain(upstream: DoqTestUpstream, certs: Certs) -> None:
    result = await query_json(upstream.port, certs, "nothing.test", "A")
    assert result["rcode"] == "NXDOMAIN"
    assert result["authority"][0].startswith("test. 300 IN SOA")
    timing = result["timing_ms"]
    assert 0 < timing["handshake"] < timing["total"]
    assert 0 < timing["first_byte"] < timing["total"]
    assert result["tls"]["version"] == "TLSv1.3"
    assert result["tls"]["alpn"] == "doq"
    assert result["session"]["early_data_sent"] is False


async def test_state_dir_resumes_then_0rtt(
    upstream: DoqTestUpstream, certs: Certs, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    first = await query_json(upstream.port, certs, "a.test", "--state-dir", str(state))
    assert first["session"]["ticket_offered"] is False
    assert first["session"]["tickets_saved"] >= 1
    ticket_file = state / "tickets.json"  # shared with forward --state-dir
    assert stat.S_IMODE(os.stat(ticket_file).st_mode) == 0o600

    second = await query_json(upstream.port, certs, "a.test", "--state-dir", str(state))
    assert second["session"]["ticket_offered"] is True
    assert second["session"]["resumed"] is True
    assert second["session"]["early_data_sent"] is False
    assert upstream.state.seen[-1].early is False

    third = await query_json(upstream.port, certs, "a.test", "--state-dir", str(state), "--0rtt")
    assert third["session"] == {
        "ticket_offered": True,
        "resumed": True,
        "early_data_sent": True,
        "early_data_accepted": True,
        "tickets_saved": third["session"]["tickets_saved"],
    }
    assert third["answer"] == ["a.test. 300 IN A 192.0.2.1"]
    assert upstream.state.seen[-1].early is True
    assert [seen.early for seen in upstream.state.seen] == [False, False, True]


async def test_0rtt_without_ticket_says_why(
    upstream: DoqTestUpstream, certs: Certs, tmp_path: Path
) -> None:
    result = await query_json(
        upstream.port, certs, "a.test", "--state-dir", str(tmp_path), "--0rtt"
    )
    assert result["session"]["early_data_sent"] is False
    assert any("no stored session ticket" in note for note in result["notes"])


async def test_0rtt_needs_state_dir(upstream: DoqTestUpstream, certs: Certs) -> None:
    code, _, err = await run_query(upstream.port, certs, "a.test", "--0rtt")
    assert code == 2
    assert "--0rtt needs --state-dir" in err


async def test_tls_error_is_one_line(upstream: DoqTestUpstream, certs: Certs) -> None:
    code, out, err = await run_query(upstream.port, certs, "a.test", ca_file=certs.other_ca_file)
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("Error: TLS handshake failed"), err
    assert "Traceback" not in err


async def test_timeout_is_one_line(upstream: DoqTestUpstream, certs: Certs) -> None:
    upstream.state.slow_delay = 5.0
    code, out, err = await run_query(upstream.port, certs, "slow.test", "--timeout", "0.5")
    assert code == 1
    assert out == ""
    assert err == f"Error: timeout: no answer from quic://127.0.0.1:{upstream.port} within 0.5s\n"


async def test_stream_reset_is_an_error(upstream: DoqTestUpstream, certs: Certs) -> None:
    code, _, err = await run_query(upstream.port, certs, "reset.test")
    assert code == 1
    assert err.startswith("Error: server reset the stream (code 0x1)")


async def test_bad_type_and_url(upstream: DoqTestUpstream, certs: Certs) -> None:
    code, _, err = await run_query(upstream.port, certs, "a.test", "NOPE")
    assert code == 1
    assert "unknown query type 'NOPE'" in err
    proc = await asyncio.create_subprocess_exec(
        *doqproxy_command("query", "a.test", "-u", "https://x"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err_bytes = await proc.communicate()
    assert proc.returncode == 1
    assert "unknown scheme 'https'" in err_bytes.decode()


@pytest.mark.skipif(
    not Path(__file__).parent.parent.joinpath("doqproxy/cli/serve.py").exists(),
    reason="doqproxy serve is not there yet",
)
async def test_servfail_from_doqproxy_serve(certs: Certs, tmp_path: Path) -> None:
    """`doqproxy serve` forwarding to a dead plain upstream answers SERVFAIL."""
    from .conftest import free_port

    dead = free_port()
    port = free_port()
    serve = await asyncio.create_subprocess_exec(
        *doqproxy_command(
            "serve",
            "-l",
            f"127.0.0.1:{port}",
            "--cert",
            certs.cert_file,
            "--key",
            certs.key_file,
            "-u",
            f"udp://127.0.0.1:{dead}",
            "--timeout",
            "0.5",
        ),
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            code, out, err = await run_query(port, certs, "a.test", "--timeout", "3")
            if "timeout" not in err and "connection failed" not in err:
                break
            await asyncio.sleep(0.1)
        assert code == 1, (out, err)
        assert "status: SERVFAIL" in out
        assert err.startswith(f"Error: SERVFAIL from quic://127.0.0.1:{port}")
        assert err.count("\n") == 1
    finally:
        serve.terminate()
        await serve.wait()
