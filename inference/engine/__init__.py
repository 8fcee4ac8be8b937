"""Running models with llama.cpp. Imports nothing from Django, so it can be tested and benchmarked alone."""

from .cache import ModelCache, ModelSpec, ModelUnavailable
from .embed import EmbeddingModel, EmbeddingRequest, embedding_context_bytes
from .llama import (
    ContextFull,
    ContextOverflow,
    EngineError,
    GrammarDeadEnd,
    GrammarUncompilable,
    LoadedModel,
    PromptError,
    SamplingParams,
    Sequence,
    StepIO,
)

__all__ = [
    "ContextFull",
    "ContextOverflow",
    "EmbeddingModel",
    "EmbeddingRequest",
    "EngineError",
    "GrammarDeadEnd",
    "GrammarUncompilable",
    "LoadedModel",
    "ModelCache",
    "ModelSpec",
    "ModelUnavailable",
    "PromptError",
    "SamplingParams",
    "Sequence",
    "StepIO",
    "embedding_context_bytes",
]
