"""Shim for the issue-12 move: removed by the integrator."""
from .pipeline.prompt.builder import Prompt, PromptBuilder  # noqa: F401
from .pipeline.prompt.seeds import row_seed  # noqa: F401
from .pipeline.prompt.tokenizer import load_tokenizer, model_location  # noqa: F401
