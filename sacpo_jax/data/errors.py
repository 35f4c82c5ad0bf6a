"""Errors for data problems: one line that names the source, the row, the field and the problem.

`BadRow` is raised inside the pipeline (by adapters and by the tokenisation
checks) for one row; the pipeline turns it into a `DataError` (policy
``error``) or into a count per reason (policy ``skip``). `DroppedRow` is a row an
adapter leaves out by design (not a data error): always counted, never an error. `DataError` is what
a user sees: its ``str()`` is a single line, and the CLI prints it and exits 2.
"""

from __future__ import annotations

from sacpo_jax.errors import SacpoError

# The reasons a row can be refused; keys of the skip report.
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_STRING = "empty_string"
INVALID_ID = "invalid_id"
IDENTICAL_RESPONSES = "identical_responses"
IDENTICAL_TOKENS = "identical_tokens"
CONTRADICTORY_SAFETY = "contradictory_safety"
NO_ROOM_FOR_RESPONSE = "no_room_for_response"
MALFORMED = "malformed"
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
NOT_UTF8 = "not_utf8"
BOTH_UNSAFE = "both_unsafe"  # SafeDPO leaves out pairs whose two answers are both unsafe


class DataError(SacpoError, ValueError):
    """A data problem, reported as one line: ``<source>: <where>: field '<f>': <problem>``
    (``where``: "line 12", "row 3" ...; a field of "-" is the whole row)."""

    def __init__(
        self,
        source: str,
        problem: str,
        *,
        row: str | None = None,
        field: str | None = None,
        reason: str = MALFORMED,
    ) -> None:
        self.source = source
        self.row = row
        self.field = field
        self.problem = problem
        self.reason = reason
        parts = [source]
        if row is not None:
            parts.append(row)
        if field not in (None, "-"):
            parts.append(f"field '{field}'")
        parts.append(" ".join(problem.split()))  # keep the message on one line
        super().__init__(": ".join(parts))


class BadRow(ValueError):
    """One row is unusable: which field, why (a reason key) and a short description."""

    def __init__(self, field: str, reason: str, problem: str) -> None:
        self.field = field
        self.reason = reason
        self.problem = problem
        super().__init__(f"field '{field}': {problem}")


class DroppedRow(Exception):
    """A valid row that an adapter's method leaves out (e.g. SafeDPO's both-unsafe pairs);
    counted in the skip report under ``reason`` whatever ``on_bad_row`` says."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)
