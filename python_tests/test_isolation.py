"""The conftest's isolation: a test that leaves a global setting changed fails, and the next test runs as alone."""

from __future__ import annotations

from pathlib import Path

import torch

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py").read_text()


def test_a_leaked_setting_fails_its_test_and_is_restored(pytester):
    threads = torch.get_num_threads()
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_inner=f"""
import os
import torch

def test_leaks_threads():
    torch.set_num_threads({threads + 1})

def test_leaks_an_environment_variable():
    os.environ["SGFUSED_ISOLATION_PROBE"] = "reference"

def test_leaks_dtype():
    torch.set_default_dtype(torch.float64)

def test_sees_the_original_state():
    assert torch.get_num_threads() == {threads}
    assert "SGFUSED_ISOLATION_PROBE" not in os.environ
    assert torch.get_default_dtype() == torch.float32

def test_is_seeded_with_zero():
    want = torch.rand(3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.rand(3), want)
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=5, errors=3)
    result.stdout.fnmatch_lines([
        f"*the test left global state changed (now restored): torch.get_num_threads(): {threads} -> {threads + 1}*",
        "*environment variable SGFUSED_ISOLATION_PROBE: None -> 'reference'*",
        "*torch.get_default_dtype(): torch.float32 -> torch.float64*",
    ])
    assert torch.get_num_threads() == threads
