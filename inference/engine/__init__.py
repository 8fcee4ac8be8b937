"""Running models with llama.cpp. Imports nothing from Django, so it can be tested and benchmarked alone."""

from .llama import ContextOverflow, Generation, LoadedModel, PromptError, SamplingParams, get_model

__all__ = ["ContextOverflow", "Generation", "LoadedModel", "PromptError", "SamplingParams", "get_model"]
