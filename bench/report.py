"""Turn the measurements into JSON entries, the goal checks and the markdown report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .dnsperf import PerfResult

TIMES = "\u00d7"  # the multiplication sign, for ratios


def perf_entry(run: PerfResult) -> dict[str, Any]:
    return {
        "qps": round(run.qps, 1),
        "avg_ms": round(run.avg_ms, 3),
        "sent": run.sent,
        "completed": run.completed,
        "lost": run.lost,
        "rcodes": run.rcodes,
        "valid": run.all_noerror,
    }


def hit_entry(run: PerfResult, paced: PerfResult, cpu: float, limit: int) -> dict[str, Any]:
    entry = perf_entry(run)
    entry["cpu_pct"] = round(cpu)
    entry["paced"] = perf_entry(paced) | {
        "qps_limit": limit,
        "p50_ms": round(paced.percentile(50), 3),
        "p99_ms": round(paced.percentile(99), 3),
        "p999_ms": round(paced.percentile(99.9), 3),
    }
    return entry


def _get(results: dict[str, Any], *path: str) -> Any:
    node: Any = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal from issues 4, 5 and 6 with the measured value and whether it is met."""
    names = _get(results, "memory", "names") or 0
    hit = _get(results, "cache_hit", "doqproxy") or {}
    paced = hit.get("paced", {})
    p99 = paced.get("p99_ms") if paced.get("valid") else None
    rows = [
        ("cache hit q/s, doqproxy / Unbound", _get(results, "cache_hit", "ratio_unbound"),
         TIMES, ">=", 0.6),
        ("cache hit q/s, doqproxy / dnsmasq", _get(results, "cache_hit", "ratio_dnsmasq"),
         TIMES, None, None),
        (f"cache hit p99 latency at {paced.get('qps_limit', 10000):,} q/s", p99,
         "ms", "<=", 1.0),
        ("first query after restart (0-RTT), 50 ms RTT, median",
         _get(results, "link", "restart_0rtt_ms", "median"), "ms", "<=", 60.0),
        ("warm miss on an open connection, 50 ms RTT, median",
         _get(results, "link", "warm_miss_ms", "median"), "ms", "<=", 52.0),
        ("first query, empty state dir (full handshake), 50 ms RTT, median",
         _get(results, "link", "full_handshake_ms", "median"), "ms", None, None),
        (f"RSS after {names:,} names", _get(results, "memory", "rss_mb"), "MB", "<=", 80.0),
        ("miss path q/s, doqproxy / bare aioquic client (1 connection)",
         _get(results, "miss_path", "ratio"), TIMES, ">=", 0.9),
        ("miss path q/s, doqproxy / bare aioquic client (4 connections)",
         _get(results, "miss_path", "ratio_4"), TIMES, None, None),
        ("p99 while the fastest of 3 upstreams is black-holed",
         _get(results, "failover", "during", "p99_ms"), "ms", "<=",
         _get(results, "failover", "goal_p99_during_ms")),
        *_engine_goals(results),
    ]  # fmt: skip
    found = []
    for name, value, unit, op, target in rows:
        met = None
        if value is not None and target is not None:
            met = value >= target if op == ">=" else value <= target
        goal = f"{'≥' if op == '>=' else '≤'} {target:g} {unit}" if target is not None else ""
        found.append({"name": name, "value": value, "unit": unit, "goal": goal, "met": met})
    return found


def _engine_goals(results: dict[str, Any]) -> list[tuple[str, Any, str, str | None, Any]]:
    """Issue 13's goals: CPU per miss on the default engine, datagrams against the
    bare client of the same engine, the warm miss against the bare-client floor."""
    found = results.get("engines") or {}
    engine = found.get("default_engine")
    ours = found.get(f"doqproxy_{engine}") or {}
    bare = found.get(f"bare_{engine}") or {}
    rows: list[tuple[str, Any, str, str | None, Any]] = [
        (f"miss path CPU per query, default engine ({engine})",
         ours.get("cpu_us_per_query"), "µs", "<=", 125.0),
    ]  # fmt: skip
    for way in ("up", "down"):
        key = f"datagrams_{way}_per_query"
        rows.append(
            (f"upstream datagrams {way} per query, doqproxy ({engine}) / bare {engine} client",
             _ratio(ours.get(key), bare.get(key)), TIMES, "<=", 1.0)
        )  # fmt: skip
    warm = _get(results, "link", "warm_miss_ms", "median")
    floor = _get(results, "link", "floor_bare_client_median_ms")
    above = None if warm is None or floor is None else round(warm - floor, 2)
    rows.append(("warm miss above the bare-client floor, 50 ms RTT", above, "ms", "<=", 0.5))
    return rows


def _ratio(a: Any, b: Any) -> float | None:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not b:
        return None
    return round(a / b, 3)


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _shares(table: dict[str, float], top: int) -> str:
    return "; ".join(f"{name} {share}%" for name, share in list(table.items())[:top])


def _verdict(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "—"}[met]


def markdown(results: dict[str, Any]) -> str:
    machine, versions = results["machine"], results["versions"]
    out = [
        f"Command: `{results['command']}` ({results['mode']} mode, {results['elapsed_s']} s)  ",
        f"Date: {results['date']}  ",
        f"Machine: {machine['nproc']} cores, {machine['cpu']}, Linux {machine['kernel']}; "
        f"load average {machine['loadavg_at_start']} at start, "
        f"{machine['loadavg_at_end']} at end  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "  ",
        f"Backends: DoQ: {results['backends']['doq']}; plain DNS for the peers: "
        f"{results['backends']['plain']}",
        "",
        "| goal | measured | target | met |",
        "| --- | ---: | --- | --- |",
    ]
    for goal in results["goals"]:
        value = _fmt(goal["value"], 3 if goal["unit"] == TIMES else 1)
        unit = "" if goal["value"] is None else f" {goal['unit']}"
        out.append(f"| {goal['name']} | {value}{unit} | {goal['goal']} | {_verdict(goal['met'])} |")
    out += _cache_hit(results) + _miss(results) + engines_section(results) + _link(results)
    out += _failover(results)
    out += _memory(results) + _profiles(results)
    for note in results.get("notes", []):
        out.append(f"\nNote: {note}")
    return "\n".join(out)


def _cache_hit(results: dict[str, Any]) -> list[str]:
    if "cache_hit" not in results:
        return []
    hit = results["cache_hit"]
    out = [
        "",
        "Cache hit, UDP, 1,000 names, warm: `dnsperf -c 4 -T 1 -l "
        f"{hit.get('seconds', '?')}`, best of the interleaved rounds (all rounds listed); "
        "p50/p99 from a separate paced `dnsperf -Q` run with per-query latencies (`-v`):",
        "",
        "| server | q/s | rounds | avg ms | CPU % | paced q/s | p50 ms | p99 ms | p99.9 ms "
        "| answers |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for peer in ("doqproxy", "unbound", "dnsmasq"):
        e = hit[peer]
        p = e["paced"]
        valid = (
            "all NOERROR" if e["valid"] and p["valid"] else f"**{e['rcodes']}, lost {e['lost']}**"
        )
        out.append(
            f"| {peer} | {_fmt(e['qps'], 0)} | {' / '.join(f'{q:,}' for q in e['rounds_qps'])} "
            f"| {_fmt(e['avg_ms'], 3)} | {e['cpu_pct']} "
            f"| {_fmt(p['qps'], 0)} | {_fmt(p['p50_ms'], 3)} | {_fmt(p['p99_ms'], 3)} "
            f"| {_fmt(p['p999_ms'], 3)} | {valid} |"
        )
    return out


def _miss(results: dict[str, Any]) -> list[str]:
    if "miss_path" not in results:
        return []
    miss = results["miss_path"]
    fwd, cpu = miss["forward"], miss["forward_cpu_pct"]
    out = [
        "",
        "Miss path (no cache), same `doqproxy serve --zone`, 100 queries in flight:",
        "",
        "| client | q/s | CPU % (client / serve) | answers |",
        "| --- | ---: | --- | --- |",
        f"| dnsperf → doqproxy forward --no-cache → serve "
        ""
        f"| {_fmt(fwd['qps'], 0)} | {cpu['forward']} / {cpu['serve']} "
        f"| {'all NOERROR' if fwd['valid'] else fwd['rcodes']} |",
    ]
    for bare in (miss["bare_client"], miss["bare_client_4"]):
        out.append(
            f"| bare aioquic client, {bare['connections']} connection(s), "
            f"{bare['concurrency']} streams → serve | {_fmt(bare['qps'], 0)} "
            f"| {bare['cpu_pct']} / {bare['serve_cpu_pct']} "
            f"| {'all NOERROR' if bare['valid'] else bare['rcodes']} |"
        )
    rss = miss.get("forward_rss_mb")
    if rss:
        out.append(f"\nforward --no-cache VmRSS: {rss[0]} MB before the runs, {rss[1]} MB after.")
    return out


def _link(results: dict[str, Any]) -> list[str]:
    if "link" not in results:
        return []
    lk = results["link"]
    out = [
        "",
        f"Latency over a link: relay adding {lk['rtt_ms']:g} ms RTT, {lk['runs']} runs, "
        "client's view (UDP query sent → answer):",
        "",
        "| case | median ms | min | max | n |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for key, text in (
        ("full_handshake_ms", "first query, empty state dir"),
        ("restart_0rtt_ms", "first query after restart (saved ticket)"),
        ("warm_miss_ms", "warm miss, open connection"),
    ):
        s = lk[key]
        out.append(f"| {text} | {s['median']} | {s['min']} | {s['max']} | {s['n']} |")
    out.append(
        f"| floor: bare aioquic client, warm query through the same relay "
        f"| {_fmt(lk.get('floor_bare_client_median_ms'), 2)} | | | |"
    )
    out.append(
        f"\nRestarts whose first connection had early data accepted: "
        f"{lk['restarts_with_early_data_accepted']} of {lk['runs']}; session resumed: "
        f"{lk['restarts_with_session_resumed']} of {lk['runs']}."
    )
    return out


def _failover(results: dict[str, Any]) -> list[str]:
    out: list[str] = []
    fo = results.get("failover")
    if fo:
        rtts = ", ".join(f"{r:g}" for r in fo["rtts_ms"])
        out += [
            "",
            f"Several upstreams: three relays ({rtts} ms RTT) to one serve, fastest strategy, "
            f"{fo['qps']} q/s of misses for {fo['seconds']:g} s; the fastest black-holed in "
            "the middle third:",
            "",
            "| phase | queries | p50 ms | p99 ms | max ms | SERVFAIL | unanswered |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for phase in ("before", "during", "after"):
            row = fo[phase]
            out.append(
                f"| {phase} | {row['queries']} | {_fmt(row['p50_ms'], 2)} "
                f"| {_fmt(row['p99_ms'], 2)} | {_fmt(row['max_ms'], 2)} | {row['servfail']} "
                f"| {row['unanswered']} |"
            )
        out.append(
            f"\nTraffic moved {fo['moved_after_ms']} ms after the black-hole "
            f"({fo['slowed_by_the_blackhole']} queries answered after ≥ "
            f"{fo['hedge_delay_min_ms']:g} ms meanwhile; {_fmt(fo.get('hedged_total'))} "
            "hedged queries in all)."
        )
    return out


def _memory(results: dict[str, Any]) -> list[str]:
    if "memory" not in results:
        return []
    mem = results["memory"]
    entries = mem["cache_entries"]
    return [
        f"\nMemory: VmRSS {mem['rss_mb_start']} MB after start, {mem['rss_mb']} MB after "
        f"{mem['names']:,} distinct names ({_fmt(entries)} cache entries; answers "
        f"{'all NOERROR' if mem['answers']['valid'] else mem['answers']['rcodes']}; "
        "default settings, no metrics endpoint; the link forwards run with --metrics-listen)."
    ]


def _profiles(results: dict[str, Any]) -> list[str]:
    out: list[str] = []
    miss, hit = results.get("miss_path", {}), results.get("cache_hit", {})
    for label, prof in (("Miss", miss.get("profile")), ("Hit", hit.get("profile"))):
        if not prof:
            continue
        out += [
            "",
            f"{label}-path profile of doqproxy forward (py-spy, {prof['samples']} samples):",
        ]
        shares = ", ".join(f"{k} {v}%" for k, v in prof["self_by_package_pct"].items())
        out.append(f"- self time by package: {shares}")
        out.append("- top self time: " + _shares(prof["top_self_pct"], 6))
        out.append(
            "- doqproxy functions, inclusive: " + _shares(prof["top_doqproxy_inclusive_pct"], 5)
        )
    return out


def engines_section(results: dict[str, Any]) -> list[str]:
    """The miss path per QUIC engine (issue 13): CPU per miss, datagrams, q/s."""
    found = results.get("engines")
    if not found:
        return []
    out = [
        "",
        f"Miss path per QUIC engine: dnsperf `-c 4 -T 1 -l {found['seconds']:g}` → forward "
        "--no-cache → serve; bare clients with 100 streams on 1 connection to the same serve. "
        "CPU per query = the client process's utime+stime over the run / answers:",
        "",
        "| client | q/s | CPU µs/query | datagrams up/query | datagrams down/query | answers |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for key, entry in found.items():
        if not isinstance(entry, dict) or not key.startswith(("doqproxy_", "bare_")):
            continue
        name = key.replace("doqproxy_", "doqproxy forward, ").replace("bare_", "bare client, ")
        valid = "all NOERROR" if entry.get("valid") else f"**{entry.get('rcodes')}**"
        out.append(
            f"| {name} | {_fmt(entry.get('qps'), 0)} | {_fmt(entry.get('cpu_us_per_query'))} "
            f"| {_fmt(entry.get('datagrams_up_per_query'), 2)} "
            f"| {_fmt(entry.get('datagrams_down_per_query'), 2)} | {valid} |"
        )
    pipe = found.get("pipeline")
    if pipe:
        out += [
            "",
            f"doqproxy's own Python per miss (`python -m bench.pipeline`: resolver → group → "
            f"pool → connection over a scripted engine that answers at once, no sockets, "
            f"{pipe['in_flight']} in flight, {pipe['event_loop']}): "
            f"**{_fmt(pipe['cpu_us_per_query'])} µs** per query.",
        ]
    cached = found.get("pipeline_cache")
    if pipe and cached:
        out[-1] += (
            f" With the cache on and every query a different name (`--cache`), a miss also "
            f"pays for the cache lookup, the coalescer and the store: "
            f"**{_fmt(cached['cpu_us_per_query'])} µs**."
        )
    floors = found.get("floor") or []
    if floors:
        out += [
            "",
            "Each engine's own floor (`python -m bench.engine_floor`): a client and a server "
            "connection of the engine talk in memory, and only the client's calls are timed "
            "(writing queries, building packets, reading the answers as events). `batch` "
            "queries are written per packet-building turn, and the server sends that turn's "
            "468-octet padded answers together, as serve does (two fit in a packet). No "
            "syscalls, no DNS work:",
            "",
            "| engine | batch | CPU µs/query | packets up/query | packets down/query |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for row in floors:
            out.append(
                f"| {row['engine']} | {row['batch']} | {_fmt(row['cpu_us_per_query'])} "
                f"| {_fmt(row['packets_up_per_query'], 2)} "
                f"| {_fmt(row['packets_down_per_query'], 2)} |"
            )
    return out


def plot(results: dict[str, Any], path: Path) -> bool:
    """A PNG of the three link cases when matplotlib is installed (the ``bench`` extra)."""
    if "link" not in results:
        return False
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return False
    link = results["link"]
    cases = [
        ("full handshake", link["full_handshake_ms"]["samples"]),
        ("restart, 0-RTT", link["restart_0rtt_ms"]["samples"]),
        ("warm miss", link["warm_miss_ms"]["samples"]),
    ]
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.boxplot([samples for _, samples in cases], labels=[name for name, _ in cases])
    axes.axhline(link["rtt_ms"], linestyle=":", color="grey", label=f"RTT {link['rtt_ms']:g} ms")
    axes.set_ylabel("ms until the answer")
    axes.set_title("doqproxy forward over a 50 ms RTT link")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
