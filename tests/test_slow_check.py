"""The conftest check that fails an unmarked test over 10 s: its rule (wall time scaled by the load and CPU
time, both over the limit) and, end to end in a pytester run with a lower limit, its failure message."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import too_slow

pytest_plugins = ["pytester"]


def test_rule_needs_both_wall_and_cpu_time_over_the_limit():
    assert too_slow(wall_s=12.0, cpu_s=11.0, load_per_core=1.0, limit_s=10.0)
    assert not too_slow(wall_s=9.0, cpu_s=18.0, load_per_core=1.0, limit_s=10.0)  # two threads for 9 s
    assert not too_slow(wall_s=30.0, cpu_s=5.0, load_per_core=1.0, limit_s=10.0)  # waiting, not working
    assert not too_slow(wall_s=25.0, cpu_s=12.0, load_per_core=3.0, limit_s=10.0)  # a busy machine
    assert too_slow(wall_s=31.0, cpu_s=12.0, load_per_core=3.0, limit_s=10.0)
    assert not too_slow(wall_s=100.0, cpu_s=100.0, load_per_core=1.0, limit_s=0.0)  # the check turned off


def test_an_unmarked_slow_test_fails_with_what_to_do(pytester, monkeypatch):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(
        test_burn="""
        import os, time
        import pytest

        def _burn():
            # over 0.3 s of CPU and over the wall bound the check computes (0.2 s x load per core)
            wall, cpu = time.perf_counter(), time.process_time()
            while True:
                load = max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
                if time.process_time() - cpu > 0.3 and time.perf_counter() - wall > 0.3 * load:
                    return

        def test_unmarked():
            _burn()

        @pytest.mark.slow
        def test_marked():
            _burn()

        def test_quick():
            pass
        """
    )
    pytester.makeini("[pytest]\nmarkers =\n    slow: slow\n")
    monkeypatch.setenv("DDETR_SLOW_LIMIT_S", "0.2")
    monkeypatch.setenv("DDETR_SLOW_CHECK", "fail")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*test_unmarked took * s (* s of CPU, load * per core) and is not marked slow*"])
    assert "@pytest.mark.slow" in result.stdout.str()
    # report mode (CI): every test passes, the unmarked slow one is named in the summary
    monkeypatch.setenv("DDETR_SLOW_CHECK", "report")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*unmarked tests over 0.2 s*", "*test_unmarked took * s*"])
    assert "test_marked took" not in result.stdout.str()
