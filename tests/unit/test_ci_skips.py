"""The guard against silent skips (tests/ci_skips.py): under CI=true a skip is a failure unless
its reason is allowlisted; locally it stays a skip and its reason is printed (-rs)."""

from __future__ import annotations

import subprocess

import pytest

from tests import ci_skips
from tests.ci_skips import REPO

pytest_plugins = ["pytester"]

SKIPPING = """
import pytest

def test_skips_in_body():
    pytest.skip("no browser here")

@pytest.mark.skip(reason="marked away")
def test_marked():
    pass

@pytest.fixture
def needs_model():
    pytest.skip("model not prepared")

def test_skips_in_fixture(needs_model):
    pass

def test_runs():
    pass
"""


def _run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str | None
) -> pytest.RunResult:
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    pytester.makepyfile(test_skipping=SKIPPING)
    return pytester.runpytest_subprocess("-p", "tests.ci_skips", "-rs", "-p", "no:cacheprovider")


def test_locally_a_skip_is_a_skip_with_its_reason(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _run(pytester, monkeypatch, None)
    result.assert_outcomes(passed=1, skipped=3)
    result.stdout.fnmatch_lines(
        ["*SKIPPED*no browser here", "*SKIPPED*marked away", "*SKIPPED*model not prepared"]
    )


def test_in_ci_every_skip_fails_the_run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _run(pytester, monkeypatch, "true")
    # A skip in the body is a failed test; one in setup (mark or fixture) an error.
    result.assert_outcomes(passed=1, failed=1, errors=2)
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*skipped under CI=true*no browser here*"])
    result.stdout.fnmatch_lines(["*skipped under CI=true*model not prepared*"])


def test_an_allowlisted_reason_still_skips_in_ci(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeconftest(
        "from tests import ci_skips\n"
        "ci_skips.CI_SKIP_ALLOWLIST['marked away'] = 'for this test only'\n"
    )
    result = _run(pytester, monkeypatch, "true")
    result.assert_outcomes(passed=1, failed=1, errors=1, skipped=1)


def test_the_allowlist_stays_minimal() -> None:
    # Every entry says why (a fresh-clone `make test` skips nothing; see the module docstring).
    assert all(why.strip() for why in ci_skips.CI_SKIP_ALLOWLIST.values())
    assert len(ci_skips.CI_SKIP_ALLOWLIST) <= 3


@pytest.mark.parametrize(("ci", "rc"), [(None, 0), ("true", 1)])
def test_browser_tools_fails_in_ci_without_a_browser(ci: str | None, rc: int) -> None:
    """No chromium, no apt-get (an empty PATH): locally a note and exit 0 (the browser tests
    skip, saying why); with CI=true exit 1, so `make test` stops before pytest."""
    env = {"PATH": "/nonexistent", **({"CI": ci} if ci else {})}
    proc = subprocess.run(
        ["/bin/bash", str(REPO / "scripts" / "browser-tools.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == rc, proc.stderr
    assert "no apt-get here" in proc.stderr
