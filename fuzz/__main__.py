"""``python -m fuzz [--scale X] [TARGET ...]``: run every fuzz target for a fixed number of
inputs and print a Markdown table of executions, exec/s and coverage.

Each target runs in its own process (libFuzzer ends the process when it is done),
with its corpus in fuzz/corpus/NAME (kept between runs, not in git) seeded from
:func:`fuzz.targets.seeds`, and the keywords in fuzz/dicts/NAME.dict if there is
one. A crashing input is written to fuzz/crashes/ and the run exits non-zero: add
the file to tests/fuzz_regressions/NAME/ with the fix.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fuzz.targets import TARGETS, write_seeds

HERE = Path(__file__).resolve().parent
RUNS = {
    "validate": 600_000,
    "cache_fast_path": 600_000,
    "doq_response": 400_000,
    "tickets": 200_000,
    "toml_config": 60_000,
}
"""Inputs per target: 1.86 million in all, about three minutes on one core here."""
_DONE = re.compile(r"DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)/")
_STAT = re.compile(r"stat::(\w+):\s+(\d+)")


@dataclass
class Result:
    name: str
    runs: int
    seconds: float
    cov: int
    features: int
    corpus: int
    crashed: bool
    tail: str

    @property
    def exec_per_sec(self) -> float:
        return self.runs / self.seconds if self.seconds > 0 else 0.0


def run_target(name: str, runs: int, *, max_total_time: int = 0) -> Result:
    """Fuzz ``name`` for ``runs`` inputs (atheris must be importable)."""
    corpus = HERE / "corpus" / name
    crashes = HERE / "crashes"
    crashes.mkdir(parents=True, exist_ok=True)
    if not corpus.exists() or not any(corpus.iterdir()):
        write_seeds(name, corpus)
    command = [
        sys.executable, "-m", "fuzz.run_target", name,
        f"-runs={runs}", "-print_final_stats=1", "-max_len=4096",
        f"-artifact_prefix={crashes}/{name}-", str(corpus),
    ]  # fmt: skip
    if max_total_time:
        command.insert(5, f"-max_total_time={max_total_time}")
    dictionary = HERE / "dicts" / f"{name}.dict"
    if dictionary.exists():
        command.insert(5, f"-dict={dictionary}")
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=HERE.parent)
    seconds = time.monotonic() - started
    output = done.stderr
    matches = list(_DONE.finditer(output))
    match = matches[-1] if matches else None
    stats = dict(_STAT.findall(output))
    executed = int(stats.get("number_of_executed_units", runs))
    return Result(
        name=name,
        runs=executed,
        seconds=seconds,
        cov=int(match.group(1)) if match else 0,
        features=int(match.group(2)) if match else 0,
        corpus=int(match.group(3)) if match else 0,
        crashed=done.returncode != 0,
        tail="\n".join(output.splitlines()[-30:]),
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__)
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=", ".join(TARGETS))
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every run count")
    args = parser.parse_args()
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown target(s) {', '.join(sorted(unknown))}; known: {', '.join(TARGETS)}")
    names = args.targets or list(TARGETS)
    print(f"# fuzzing, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"command: python -m fuzz --scale {args.scale:g} {' '.join(args.targets)}".rstrip())
    print()
    print("| target | inputs | seconds | exec/s | cov (edges) | features | corpus | result |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    failed = False
    total = 0
    for name in names:
        result = run_target(name, max(1, int(RUNS[name] * args.scale)))
        total += result.runs
        verdict = "CRASH (see fuzz/crashes/)" if result.crashed else "ok"
        print(
            f"| {name} | {result.runs:,} | {result.seconds:.0f} | {result.exec_per_sec:,.0f} "
            f"| {result.cov} | {result.features} | {result.corpus} | {verdict} |",
            flush=True,
        )
        if result.crashed:
            failed = True
            print(result.tail, file=sys.stderr)
    print(f"\n{total:,} inputs in all.")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
