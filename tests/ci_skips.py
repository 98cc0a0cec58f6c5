"""No silent skips in CI: a pytest plugin, registered by tests/conftest.py.

Locally a test may skip (a browser or a prepared model is missing) and `-rs` (pyproject's
addopts) prints why. In CI (CI=true; .ci/run sets it) everything a test needs is installed by
`make test` (setup.sh: venv, torch, the packaged models and the router; deploy-tools.sh;
browser-tools.sh, which fails in CI without a browser), so a skip there means a test that did
not run while the run looks green: it is reported as a failure instead, with the skip's reason.

An exception needs its reason (a substring of the skip message) in CI_SKIP_ALLOWLIST, with why
it is fine. The list is empty on purpose: a fresh-clone `make test` skips nothing.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]

CI_SKIP_ALLOWLIST: dict[str, str] = {}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail") or not in_ci():
        return
    reason = _skip_reason(report)
    if any(allowed in reason for allowed in CI_SKIP_ALLOWLIST):
        return
    report.outcome = "failed"
    report.longrepr = (
        f"{item.nodeid} skipped under CI=true, which is a failure here: {reason}\n"
        "(exceptions: CI_SKIP_ALLOWLIST in tests/ci_skips.py)"
    )
