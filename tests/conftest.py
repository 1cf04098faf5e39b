"""Suite-wide hooks: the fault-injection summary (tests/faults/ and tests/test_cli_errors.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:  # every case of the CLI error boundary is a fault case too
        if Path(str(item.fspath)).name == "test_cli_errors.py":
            item.add_marker(pytest.mark.fault)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    """How many fault cases and fuzz inputs the suite tried (works across xdist workers: the
    counts travel in each report's user_properties)."""
    tests = cases = fuzz = 0
    for outcome in ("passed", "failed"):
        for rep in terminalreporter.stats.get(outcome, []):
            if getattr(rep, "when", "call") != "call" or "fault" not in getattr(rep, "keywords", {}):
                continue
            tests += 1
            props = dict(getattr(rep, "user_properties", []))
            cases += int(props.get("fault_cases", 1))
            fuzz += int(props.get("fuzz_inputs", 0))
    if tests:
        terminalreporter.write_line(f"fault-injection suite: {tests} tests, {cases} fault cases, "
                                    f"{fuzz} fuzz inputs")
