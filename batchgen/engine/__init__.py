from .request import CompletionOutput, GenerationRequest, RequestOutput, SamplingParams
from .stats import EngineStats

__all__ = ["Engine", "EngineStats", "SamplingParams", "GenerationRequest", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str):
    if name == "Engine":  # torch and transformers load only when the engine is used
        from .engine import Engine

        return Engine
    raise AttributeError(name)
