"""Where the test suite's time goes on a CPU-bound machine: machine-wide busy CPU-seconds around each test.

    python bench/suite_cpu.py [pytest args ...]        e.g. python bench/suite_cpu.py -q tests/test_tune.py

On 2 cores the suite keeps both busy nearly throughout (Ray, MLflow and the background chaos run), so its wall time
is its total CPU divided by two and a test's wall time says little about its own cost. This runs pytest with a
plugin that reads /proc/stat (all processes: the test's Ray actors and servers included) before and after each test,
then prints the total, the per-file sums and the costliest tests. A test that runs beside the chaos run is charged
that run's CPU too: compare totals, or run a file alone for its own cost. Linux only (/proc/stat).
"""

from __future__ import annotations

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pipeline.study.overhead import busy_cpu_s  # noqa: E402 - after the repo is on the path


class CpuAccount:
    def __init__(self):
        self.rows: dict[str, tuple[float, float]] = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        b, t = busy_cpu_s(), time.time()
        yield
        self.rows[item.nodeid] = (busy_cpu_s() - b, time.time() - t)


def main(argv: list[str]) -> int:
    acct = CpuAccount()
    t0, b0 = time.time(), busy_cpu_s()
    rc = pytest.main(argv, plugins=[acct])
    wall, cpu = time.time() - t0, busy_cpu_s() - b0
    print(f"\n[suite_cpu] {wall:.1f} s wall, {cpu:.0f} busy CPU-s ({cpu / max(wall, 1e-9):.2f} of "
          f"{os.cpu_count()} cores busy on average)")
    files: dict[str, list[float]] = {}
    for nodeid, (c, w) in acct.rows.items():
        f = files.setdefault(nodeid.split("::")[0], [0.0, 0.0])
        f[0] += c
        f[1] += w
    print("[suite_cpu] per file (busy CPU-s, wall s):")
    for name, (c, w) in sorted(files.items(), key=lambda x: -x[1][0])[:15]:
        print(f"  {c:7.1f} {w:7.1f}  {name}")
    print("[suite_cpu] costliest tests:")
    for nodeid, (c, w) in sorted(acct.rows.items(), key=lambda x: -x[1][0])[:15]:
        print(f"  {c:7.1f} {w:7.1f}  {nodeid}")
    return int(rc)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
