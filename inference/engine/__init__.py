"""Running models with llama.cpp. Imports nothing from Django, so it can be tested and benchmarked alone."""

from .cache import ModelCache, ModelSpec, ModelUnavailable, parse_keep_alive
from .llama import (
    ContextOverflow,
    EngineError,
    LoadedModel,
    PromptError,
    SamplingParams,
    Sequence,
    StepIO,
)

__all__ = [
    "ContextOverflow",
    "EngineError",
    "LoadedModel",
    "ModelCache",
    "ModelSpec",
    "ModelUnavailable",
    "PromptError",
    "SamplingParams",
    "Sequence",
    "StepIO",
    "parse_keep_alive",
]
