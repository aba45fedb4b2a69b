"""Shim for the issue-12 move: removed by the integrator."""
from .pipeline.prompt.request_params import RowParamsError, request_params  # noqa: F401
