"""A stage's pass/fail checks: each `Check` names what was measured against which named threshold, and a stage's
`judge(...)` function (gate, distill, deturbo, quantize, ...) returns a list of them, so a changed threshold or a broken
check fails a unit test instead of hiding in a notebook cell. `report.finish` records and shows them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

PASS_MARK, FAIL_MARK = "pass", "FAIL"  # plain words: they render in any font (emoji marks showed as empty boxes)


@dataclass(frozen=True)
class Check:
    name: str     # what was checked, with the measured values and the threshold, e.g. "student@1 ≥ 0.97× teacher (…)"
    passed: bool


def all_passed(checks: Sequence[Check]) -> bool:
    return all(check.passed for check in checks)


def as_record(checks: Sequence[Check]) -> dict[str, bool]:
    """The metrics-file form: {check name: passed}."""
    return {check.name: bool(check.passed) for check in checks}


def markdown(checks: Sequence[Check], verdict: str) -> str:
    """A bullet per check with a plain-text mark, then the overall PASS/FAIL and the verdict line."""
    lines = [f"- **{PASS_MARK if c.passed else FAIL_MARK}** {c.name}" for c in checks]
    overall = "PASS" if all_passed(checks) else "FAIL"
    return "\n".join(lines) + f"\n\n**{overall}** — {verdict}"
