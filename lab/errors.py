"""Errors of the lab."""

from workers.errors import LaxError


class LabError(LaxError):
    """The lab could not be brought up, inspected or torn down."""

    code = "LabError"
    http_status = 500


class LabTimeout(LabError):
    """Something the lab waited for did not happen in time."""

    code = "LabTimeout"
