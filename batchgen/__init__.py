"""batchgen: offline batch generation with a continuous-batching engine."""
from .engine import CompletionOutput, GenerationRequest, RequestOutput, SamplingParams

__all__ = ["Engine", "SamplingParams", "GenerationRequest", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Engine":
        from .engine.engine import Engine

        return Engine
    raise AttributeError(name)
