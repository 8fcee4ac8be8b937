"""A clone of the repository runs the suite with nothing else: no test data lives outside it."""

import re
from pathlib import Path

from tests.openapi import SPEC

ROOT = Path(__file__).resolve().parent.parent


def test_the_openai_spec_the_tests_validate_against_ships_with_the_repository():
    assert SPEC.resolve().is_relative_to(ROOT), SPEC
    assert SPEC.stat().st_size > 1_000_000  # the whole spec, not a stub
    assert "CreateChatCompletionResponse:" in SPEC.read_text()


def test_no_test_reads_a_file_beside_the_repository():
    outside = re.compile(r"\.\./shared|/shared/openai|/work/")  # the sibling folder these files came from
    sources = [p for p in (ROOT / "tests").rglob("*") if p.suffix in {".py", ".mjs"} and "node_modules" not in p.parts]
    offenders = [str(p.relative_to(ROOT)) for p in sources if p != Path(__file__) and outside.search(p.read_text())]
    assert offenders == []
