"""How much JSON a request body may hold, checked in a separate process for large bodies.

A leaf module (the standard library only), because `parse_body` runs `json_check` in a spawned process: parsing
and validating are C and Rust code that hold the GIL, so a thread would not free daphne's event loop, and an 8 MiB
body of small values costs seconds (hundreds of thousands of objects to build and validate). The check parses
aside and counts; only a body within the bounds is then parsed on the loop, which costs milliseconds."""

import json

MAX_JSON_VALUES = 200_000  # every value and key (strings, numbers, objects, arrays): a 128k-token id prompt fits
MAX_JSON_OBJECTS = 10_000  # objects cost the most to validate (a message, a content part, a tool call each)


def json_check(raw: bytes) -> str:
    """ "" if the body is JSON within the bounds; "invalid" if it is not JSON; else the refusal's message."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return "invalid"
    values, objects, stack = 0, 0, [data]
    while stack:
        value = stack.pop()
        values += 1
        if isinstance(value, dict):
            objects += 1
            values += len(value)  # the keys
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        if values > MAX_JSON_VALUES or objects > MAX_JSON_OBJECTS:
            return (
                f"The request body holds too many JSON values (at most {MAX_JSON_VALUES:,} values and "
                f"{MAX_JSON_OBJECTS:,} objects)."
            )
    return ""
