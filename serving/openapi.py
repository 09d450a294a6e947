"""The OpenAPI 3.1 description of what the proxy serves, for API tools (Apidog, Postman, Swagger UI).

Served at GET /openapi.json (with the configured forward paths and model names); the copy in
serving/openapi.json is this with the defaults (`python -m serving.openapi > serving/openapi.json`,
checked for drift by the tests). Request schemas name what the proxy reads, shapes or documents
(the Qwen fields included) and leave other OpenAI fields open, passed to vLLM as sent.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from serving.config import DEFAULT_FORWARD_PATHS

Schema = dict[str, Any]

NULLABLE_STRING: Schema = {"type": ["string", "null"]}
ERROR: Schema = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type"],
        "properties": {
            "message": {"type": "string", "description": "What was wrong, where, and what to do."},
            "type": {"type": "string"},
            "param": {"type": ["string", "null"], "description": "The request field at fault, if one is."},
            # The proxy's own codes are strings; vLLM's errors, passed through, carry the status.
            "code": {"type": ["string", "integer", "null"]},
        },
    }},
}
STOP: Schema = {
    "description": "Up to 4 stop strings; or, as Qwen-hosting APIs accept, token ids (a list of ids, "
                   "or of one-id lists), which the proxy sends to vLLM as stop_token_ids.",
    "oneOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        {"type": "array", "items": {"oneOf": [{"type": "integer"},
                                              {"type": "array", "items": {"type": "integer"}, "minItems": 1,
                                               "maxItems": 1}]}},
        {"type": "null"},
    ],
}
SAMPLING: dict[str, Schema] = {
    "model": {"type": "string", "description": "A served name, an alias, a LoRA adapter's name, or a "
                                               "profile's hub id (GET /v1/models lists them)."},
    "stream": {"type": "boolean", "description": "Without it the answer comes whole, once every token is "
                                                "generated (bounded by the model's timeouts.response_seconds)."},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "max_tokens": {"type": "integer", "minimum": 1, "description": "Default and cap from the model's profile; "
                                                                    "a default above the backend's max_model_len "
                                                                    "is lowered to it (x-qwen-warning says so)."},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2,
                    "description": "0 (greedy) is refused, warned about or allowed per profile."},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": -1, "description": "Qwen field: -1 or 0 turns it off."},
    "min_p": {"type": "number", "minimum": 0, "maximum": 1, "description": "Qwen field."},
    "repetition_penalty": {"type": "number", "exclusiveMinimum": 0, "description": "Qwen field; 1.0 is off."},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "seed": {"type": "integer"},
    "n": {"type": "integer", "minimum": 1},
    "stop": STOP,
    "stop_token_ids": {"type": "array", "items": {"type": "integer"}},
    "logprobs": {"type": ["boolean", "integer"]},
    "user": {"type": "string", "description": "Keys a session to one backend when x-session-id is absent."},
}
CHAT_REQUEST: Schema = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        **SAMPLING,
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["role"],
            "properties": {
                "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
                "content": {"type": ["string", "array", "null"]},
                "reasoning": {"type": "string", "description": "An assistant turn's reasoning, sent back."},
                "reasoning_content": {"type": "string", "description": "The same, as DashScope/DeepSeek "
                                                                       "clients name it."},
                "tool_calls": {"type": "array"},
                "tool_call_id": {"type": "string"},
            },
        }},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "enable_thinking": {"type": "boolean", "description": "Qwen field: becomes "
                                                               "chat_template_kwargs.enable_thinking."},
        "chat_template_kwargs": {"type": "object", "description": "Passed to the model's chat template; "
                                                                  "profile defaults merge key by key."},
        "tools": {"type": "array", "maxItems": 128},
        "tool_choice": {"oneOf": [{"type": "string", "enum": ["none", "auto", "required"]}, {"type": "object"}]},
        "parallel_tool_calls": {"type": "boolean"},
        "response_format": {"type": "object"},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        "logit_bias": {"type": "object", "additionalProperties": {"type": "number", "minimum": -100,
                                                                  "maximum": 100}},
        "enable_search": {"type": "boolean", "description": "Refused when true: no web search here."},
        "incremental_output": {"type": "boolean", "description": "Refused when false: streams carry deltas."},
        "result_format": {"type": "string", "enum": ["message"]},
    },
}
COMPLETION_REQUEST: Schema = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {**SAMPLING, "prompt": {"type": ["string", "array"]}, "echo": {"type": "boolean"}},
}
USAGE: Schema = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {"prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
                   "total_tokens": {"type": "integer"}},
}
MESSAGE: Schema = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"type": "string", "enum": ["assistant"]},
        "content": NULLABLE_STRING,
        "reasoning": {**NULLABLE_STRING, "description": "The model's reasoning (vLLM's field name)."},
        "reasoning_content": {**NULLABLE_STRING, "description": "The same text, added for Qwen clients."},
        "tool_calls": {"type": ["array", "null"]},
    },
}
CHAT_COMPLETION: Schema = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": {"type": "integer"},
        "model": {"type": "string", "description": "The name the client asked for."},
        "choices": {"type": "array", "items": {
            "type": "object", "required": ["index", "message", "finish_reason"],
            "properties": {"index": {"type": "integer"}, "message": MESSAGE, "finish_reason": NULLABLE_STRING}}},
        "usage": USAGE,
    },
}
COMPLETION: Schema = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": {"type": "string"}, "object": {"const": "text_completion"}, "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {"type": "array", "items": {
            "type": "object", "required": ["index", "text", "finish_reason"],
            "properties": {"index": {"type": "integer"}, "text": {"type": "string"},
                           "finish_reason": NULLABLE_STRING}}},
        "usage": USAGE,
    },
}
MODEL_LIST: Schema = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
        "type": "object", "required": ["id", "object", "created", "owned_by"],
        "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                       "owned_by": {"type": "string"}, "root": {"type": "string"},
                       "parent": {**NULLABLE_STRING, "description": "For a LoRA adapter, the model it runs on."},
                       "max_model_len": {"type": "integer"}}}}},
}
SSE: Schema = {  # one server-sent event
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string", "contentMediaType": "application/json"}, "event": {"type": "string"}},
    "description": "Server-sent events: `data: {chunk}` per token event (chat.completion.chunk or "
                   "text_completion), then `data: [DONE]`; an error mid-stream is one `data: {\"error\": ...}` "
                   "event, then the end.",
}
SHAPING_HEADERS = {
    "x-qwen-defaults-applied": {"description": "Profile defaults filled into the request.",
                                "schema": {"type": "string"}},
    "x-qwen-warning": {"description": "What was changed or ignored (caps, greedy decoding, fields vLLM "
                                      "does not implement).", "schema": {"type": "string"}},
}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {400: "Invalid request (the message and `param` say what and where)", 401: "Missing or wrong API key",
               404: "Unknown model or endpoint", 405: "Wrong method", 413: "Body over limits.max_body_bytes",
               429: "Rate limit per identity: the API key, else the client's address (Retry-After)",
               431: "Headers over 64 KiB",
               500: "An internal error of the proxy (a bug, logged): the message and x-request-id name the request",
               502: "The backend failed the request",
               503: "No healthy backend for the model, or the proxy's own limits (Retry-After)",
               504: "The backend took too long: a stream's first byte beyond timeouts.first_byte_seconds, or a "
                    "whole (non-streamed) answer beyond timeouts.response_seconds",
               505: "A stream needs HTTP/1.1"}
    return {str(s): {"description": reasons[s], "content": {"application/json": {"schema": ref("Error")}}}
            for s in statuses}


def _generation(summary: str, request: str, answer: str) -> dict[str, Any]:
    return {"post": {
        "summary": summary,
        "security": [{}, {"bearer": []}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": ref(request)}}},
        "responses": {
            "200": {"description": "The answer: JSON, or server-sent events when `stream` is true.",
                    "headers": SHAPING_HEADERS,
                    "content": {"application/json": {"schema": ref(answer)},
                                "text/event-stream": {"schema": SSE}}},
            **_errors(400, 401, 404, 405, 413, 429, 431, 500, 502, 503, 504, 505),
        },
    }}


def _plain(summary: str, content_type: str, schema: Schema) -> dict[str, Any]:
    return {"get": {"summary": summary,
                    "responses": {"200": {"description": summary, "content": {content_type: {"schema": schema}}},
                                  **_errors(405)}}}


# /ready's detail per model (serving/routing.py ModelBackends.health).
MODEL_HEALTH = {"type": "object", "required": ["healthy", "ejected", "backends"], "properties": {
    "healthy": {"type": "integer", "minimum": 0, "description": "Backends in rotation"},
    "ejected": {"type": "integer", "minimum": 0, "description": "Backends out of rotation after failing requests"},
    "backends": {"type": "object", "additionalProperties": {"enum": ["up", "down", "ejected", "half_open"]}}}}


def build_spec(forward_paths: list[str] | tuple[str, ...] = DEFAULT_FORWARD_PATHS) -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/v1/chat/completions": _generation("Chat completion: profile defaults applied, Qwen fields honoured",
                                            "ChatRequest", "ChatCompletion"),
        "/v1/completions": _generation("Text completion", "CompletionRequest", "Completion"),
        "/v1/models": {"get": {"summary": "Every name the proxy answers to", "security": [{}, {"bearer": []}],
                               "responses": {"200": {"description": "The model list",
                                                     "content": {"application/json": {"schema": ref("ModelList")}}},
                                             **_errors(401, 405, 429, 500)}}},
        "/health": _plain("The proxy process answers", "application/json",
                          {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}),
        "/ready": {"get": {"summary": "The proxy can serve: started and not draining. Each model's backends are in "
                                      "the body only (a model without one answers its own requests 503)",
                           "responses": {code: {"description": what, "content": {"application/json": {"schema": {
                               "type": "object", "required": ["ready", "draining", "models"],
                               "properties": {"ready": {"type": "boolean"}, "draining": {"type": "boolean"},
                                              "models": {"type": "object", "additionalProperties": MODEL_HEALTH}}}}}}
                               for code, what in (("200", "Ready"), ("503", "Draining, or not started yet"))}}},
        "/metrics": _plain("Prometheus metrics (qwen_proxy_*)", "text/plain", {"type": "string"}),
        "/openapi.json": _plain("This description", "application/json", {"type": "object"}),
    }
    for path in forward_paths:
        paths[path] = {"post": {
            "summary": "Forwarded untouched to the backend of the body's `model` (path and query as sent)",
            "security": [{}, {"bearer": []}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["model"], "properties": {"model": SAMPLING["model"]}}}}},
            "responses": {"200": {"description": "The backend's answer, unchanged", "content": {"*/*": {}}},
                          "default": {"description": "The backend's answer, unchanged", "content": {"*/*": {}}},
                          **_errors(400, 401, 404, 405, 413, 429, 500, 502, 503, 504)},
        }}
    return {
        "openapi": "3.1.0",
        "info": {"title": "qwen-serve proxy", "version": "0.1.0",
                 "description": "OpenAI-compatible API in front of vLLM serving Qwen models. Errors are "
                                "`{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "Required when the proxy has API keys (auth.*)."}},
            "schemas": {"Error": ERROR, "ChatRequest": CHAT_REQUEST, "CompletionRequest": COMPLETION_REQUEST,
                        "ChatCompletion": CHAT_COMPLETION, "Completion": COMPLETION, "ModelList": MODEL_LIST},
        },
        "paths": paths,
    }


def spec_json(forward_paths: list[str] | tuple[str, ...] = DEFAULT_FORWARD_PATHS) -> bytes:
    return (json.dumps(build_spec(forward_paths), indent=2, sort_keys=True) + "\n").encode()


if __name__ == "__main__":
    sys.stdout.buffer.write(spec_json())
