"""The DPS query language, as far as provisiond reads it.

DPS documents ``POST .../query`` with a SQL-like text (``SELECT * FROM enrollments``) and then
ignores any WHERE clause (Azure/azure-iot-sdk-csharp#794). provisiond honours it: equality
conditions on the common fields, joined with AND::

    SELECT * FROM enrollments WHERE provisioningStatus = 'disabled' AND attestation.type = 'x509'

Field names are case-insensitive; string values are single- or double-quoted (a doubled quote
escapes itself). ``*`` alone, and ``SELECT *`` without FROM, mean every record. Anything else is
a 400 that lists the fields that can be filtered on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ..errors import InvalidQueryError

__all__ = ["ENROLLMENT_FIELDS", "GROUP_FIELDS", "REGISTRATION_FIELDS", "parse_query"]

#: query field (lower-cased) -> (store filter column, whether the value is compared lower-cased)
ENROLLMENT_FIELDS: Mapping[str, tuple[str, bool]] = {
    "registrationid": ("id", False),
    "deviceid": ("device_id", False),
    "provisioningstatus": ("provisioning_status", True),
    "attestation.type": ("attestation_type", True),
    "iothubhostname": ("iot_hub_host_name", True),
}
GROUP_FIELDS: Mapping[str, tuple[str, bool]] = {
    "enrollmentgroupid": ("id", False),
    "provisioningstatus": ("provisioning_status", True),
    "attestation.type": ("attestation_type", True),
    "iothubhostname": ("iot_hub_host_name", True),
}
REGISTRATION_FIELDS: Mapping[str, tuple[str, bool]] = {
    "registrationid": ("id", False),
    "deviceid": ("device_id", False),
    "status": ("status", True),
    "assignedhub": ("assigned_hub", True),
    "enrollmentgroupid": ("enrollment_group_id", True),
}

# "SELECT * FROM x [WHERE ...]", and "SELECT *" alone (azure-iot-deviceprovisioning's tests send it).
# The WHERE clause is taken whole (greedy) and its end trimmed in Python: a lazy group followed
# by optional blanks and ";" backtracked quadratically over a clause of blanks (2,000 took 8 s).
_SELECT = re.compile(
    r"^\s*select\s+\*(?:\s*\bfrom\s+([A-Za-z_]\w*))?(?:\s*\bwhere\s+(.*))?$",
    re.IGNORECASE | re.DOTALL,
)
_CONDITION = re.compile(
    r"""\s*([A-Za-z_][\w.]*)\s*=\s*(?:'((?:[^']|'')*)'|"((?:[^"]|"")*)")\s*(?:\band\b|$)""", re.IGNORECASE
)
_MAX_QUERY = 2048


def parse_query(text: str, fields: Mapping[str, tuple[str, bool]]) -> dict[str, str] | None:
    """The store filters a query text asks for: empty for no WHERE clause, ``None`` when the
    conditions contradict each other (``a = 'x' AND a = 'y'``) and nothing can match.

    :raises InvalidQueryError: the text is not ``SELECT * FROM x [WHERE a = 'v' [AND ...]]`` or
        names a field that cannot be filtered on.
    """
    if len(text) > _MAX_QUERY:
        raise InvalidQueryError(f"The query is longer than {_MAX_QUERY} characters.")
    if text.strip() == "*":  # all records: the query in Microsoft's service SDK samples (C, Node.js)
        return {}
    match = _SELECT.match(text.strip().removesuffix(";").rstrip())
    if match is None:
        raise InvalidQueryError(
            f"Unsupported query {text[:200]!r}: use * or SELECT * FROM <collection> [WHERE field = 'value' [AND ...]]."
        )
    where = match.group(2)
    filters: dict[str, str] = {}
    contradiction = False
    if not where:
        return filters
    pos = 0
    while pos < len(where):
        cond = _CONDITION.match(where, pos)
        if cond is None or cond.end() == pos:
            raise InvalidQueryError(
                f"Cannot read the WHERE clause at {where[pos : pos + 60]!r}: only field = 'value' conditions "
                "joined by AND are supported."
            )
        name = cond.group(1).lower()
        if name not in fields:
            raise InvalidQueryError(
                f"Cannot filter on {cond.group(1)!r}; the fields are: {', '.join(sorted(fields))}."
            )
        column, lower = fields[name]
        value = (
            cond.group(2).replace("''", "'")
            if cond.group(2) is not None
            else cond.group(3).replace('""', '"')
        )
        value = value.lower() if lower else value
        if filters.get(column, value) != value:
            contradiction = True
        filters[column] = value
        pos = cond.end()
    return None if contradiction else filters
