"""Tool calling in the generic format (llama-server's fallback for templates without tool support), a leaf
module like protocol.py: the worker uses it to prompt and constrain the model, the view to parse its answer.

The model answers in JSON, forced by a grammar: `{"tool_calls": [{"name": ..., "arguments": {...}}]}` to call
tools, or `{"response": "..."}` to answer in words (only when tool_choice is "auto")."""

import json
import uuid

from .protocol import ChatCompletionRequest


def tools_active(body: ChatCompletionRequest) -> bool:
    """Whether this request offers tools to the model (tool_choice "none" offers none)."""
    return bool(body.tools) and body.tool_choice != "none"


def tool_instruction(body: ChatCompletionRequest) -> str:
    """A system-prompt paragraph describing the tools and the answer format."""
    tools = [
        {
            "name": t.function.name,
            "description": t.function.description or "",
            "parameters": t.function.parameters or {},
        }
        for t in _offered(body)
    ]
    lines = [
        "You can call these tools:",
        json.dumps(tools, ensure_ascii=False),
        'To call tools, answer with JSON: {"tool_calls": [{"name": "<tool name>", "arguments": {<its parameters>}}]}',
    ]
    if body.tool_choice in (None, "auto"):
        lines.append('To answer without a tool, answer with JSON: {"response": "<your answer>"}')
    return "\n".join(lines)


def tool_schema(body: ChatCompletionRequest) -> dict:
    """The JSON schema of the answers this request allows; the worker turns it into a grammar."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t.function.name},
                "arguments": t.function.parameters or {"type": "object"},
            },
            "required": ["name", "arguments"],
        }
        for t in _offered(body)
    ]
    tool_calls = {"type": "array", "items": {"anyOf": calls} if len(calls) > 1 else calls[0], "minItems": 1}
    if body.parallel_tool_calls is False:
        tool_calls["maxItems"] = 1
    call_answer = {"type": "object", "properties": {"tool_calls": tool_calls}, "required": ["tool_calls"]}
    if body.tool_choice in (None, "auto"):
        words = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"]}
        return {"anyOf": [call_answer, words]}
    return call_answer


def parse_tool_answer(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) from the model's JSON answer; text that is not such JSON (e.g. cut off by
    max_tokens) stays content."""
    try:
        answer = json.loads(text)
    except ValueError:
        return text, []
    if isinstance(answer, dict) and isinstance(answer.get("tool_calls"), list):
        calls = [
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": call.get("name", ""), "arguments": json.dumps(call.get("arguments") or {})},
            }
            for call in answer["tool_calls"]
            if isinstance(call, dict)
        ]
        return None, calls
    if isinstance(answer, dict) and isinstance(answer.get("response"), str):
        return answer["response"], []
    return text, []


def _offered(body: ChatCompletionRequest):
    choice = body.tool_choice
    if isinstance(choice, str) or choice is None:
        return body.tools
    return [t for t in body.tools if t.function.name == choice.function.name]
