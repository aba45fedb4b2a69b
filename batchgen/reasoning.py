"""Shim for the issue-12 move: removed by the integrator."""
from .pipeline.prompt.reasoning import DEFAULT_TAGS, reasoning_tags, split_reasoning  # noqa: F401
