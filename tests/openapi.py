"""Validate response bodies against the official OpenAI OpenAPI spec, kept in the repository (tests/data/openai/)."""

import functools
import os
from pathlib import Path

import jsonschema
import yaml

SPEC = Path(os.environ.get("MINERVA_OPENAPI_SPEC", Path(__file__).resolve().parent / "data/openai/openapi.yaml"))


@functools.cache
def _spec() -> dict:
    with SPEC.open() as f:
        spec = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    _honour_nullable(spec)
    return spec


def _honour_nullable(node) -> None:
    """The spec is OpenAPI 3.1 but still marks some fields with 3.0's `nullable: true` (e.g. a chunk's
    `finish_reason`, null until the last chunk), which JSON Schema ignores: translate it to `null` types."""
    if isinstance(node, dict):
        if node.get("nullable") is True and "type" in node:
            node["type"] = [node["type"], "null"] if isinstance(node["type"], str) else [*node["type"], "null"]
            if "enum" in node and None not in node["enum"]:
                node["enum"] = [*node["enum"], None]
        for value in node.values():
            _honour_nullable(value)
    elif isinstance(node, list):
        for value in node:
            _honour_nullable(value)


@functools.cache
def _validator(name: str) -> jsonschema.Draft202012Validator:
    # The whole document is the root schema, so `#/components/schemas/...` references resolve.
    schema = dict(_spec(), **{"$ref": f"#/components/schemas/{name}"})
    return jsonschema.Draft202012Validator(schema)


def assert_schema(name: str, body: dict) -> None:
    """Fail with the first violation of the named component schema."""
    error = jsonschema.exceptions.best_match(_validator(name).iter_errors(body))
    if error is not None:
        raise AssertionError(f"{name}: {error.message} at {list(error.absolute_path)}\n{body}")
