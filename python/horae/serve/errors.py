"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and the ASGI guard
every request passes: the bearer key (compared in constant time) and the body-size limit."""

from __future__ import annotations

import hmac
import json
import logging
from typing import Dict, Optional

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers

    def renamed(self, names: Dict[str, str]) -> "APIError":
        """This refusal naming its field as the client spelled it: `names` maps the engine's or
        another form's field (the head of `param`) to the body's; the whole field is named, since
        the parts of one form's field are not the other's."""
        name = names.get((self.param or "").partition(".")[0])
        if name is None or name == self.param:
            return self
        return APIError(self.status, self.message.replace(self.param, name, 1), self.type, name, self.code, self.headers)


def error_body(message: str, type: str, param=None, code=None) -> dict:
    return {"error": {"message": _utf8(message), "type": type, "param": _utf8(param), "code": code}}


def _utf8(text):
    """`text` as UTF-8 can carry it: a message may quote what the client sent, and JSON can send
    a lone surrogate ("\\ud800"), which no UTF-8 body can hold (a 500 when the error was written,
    instead of the error); such a character is written as its escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(text, str) else text


def first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def bad_request(e: BaseException, param: Optional[str] = None) -> APIError:
    """A refusal from the engine's checks (a `ValueError` or `TypeError`; the core's name the
    field at fault in `param`) as a 400; the context limit gets OpenAI's
    `context_length_exceeded` code."""
    msg = first_line(e)
    param = getattr(e, "param", None) or param
    if "maximum context length" in msg:
        return APIError(400, msg, param=param, code="context_length_exceeded")
    return APIError(400, msg, param=param)


def _field_path(loc) -> list:
    """A validation error's location as the request's fields and indices: without "body" and
    without pydantic's names of union branches ("str", "list[constrained-int]", "type=message"),
    which no field's name looks like."""
    return [str(x) for x in loc if x != "body" and not (isinstance(x, str) and (
        x in ("str", "int", "float", "bool", "dict", "list") or any(c in x for c in "[-=")))]


def invalid_body(errs: list) -> APIError:
    """A body's validation errors (pydantic's) as one 400 naming the field at fault in `param`
    and first in the message."""
    first = errs[0] if errs else {}
    # Of a union's branches (a prompt as text or token lists, a Responses input item), the
    # one that got furthest says what is wrong: "prompt.0.1" rather than "not a string".
    field = _field_path(first.get("loc", ()))[:1]
    first = max((x for x in errs if _field_path(x["loc"])[:1] == field), key=lambda x: len(_field_path(x["loc"])),
                default=first)
    loc = _field_path(first.get("loc", ()))
    # A check across a model's fields names the one it blames (protocol's `FieldError`).
    blamed = getattr((first.get("ctx") or {}).get("error"), "field", None)
    if isinstance(blamed, str):
        loc.append(blamed)
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        msg = "the request body is not valid JSON"
    elif not param and first.get("type") in ("missing", "model_attributes_type"):
        # The body itself: empty, or JSON that is not an object ("[]", "1", "null").
        msg = "the request body must be a JSON object" + (", and was empty" if first["type"] == "missing" else "")
    elif first.get("type") == "extra_forbidden":
        msg = f"Unrecognized request argument supplied: {param}"
    else:
        # A validator's own message, without pydantic's "Value error, " before it, the field
        # named first, once.
        text = first.get("msg", "invalid request").removeprefix("Value error, ")
        if not param:
            msg = text
        elif text.startswith(loc[-1]):  # "content is required" -> "messages.0.content is required"
            msg = param + text[len(loc[-1]):]
        else:
            msg = f"{param}: {text}"
    return APIError(400, msg, "invalid_request_error", param, first.get("type"))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, e: RequestValidationError):
        return await _api_error(_, invalid_body(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)


#: What a probe may read without the key (a load balancer's health check; the version).
OPEN_ROUTES = ("/health", "/version")


class Guard:
    """Bearer key on every route but /health and /version, and the body-size limit, as plain ASGI middleware:
    Starlette's BaseHTTPMiddleware makes a streaming response see a disconnect that did not
    happen, which would abort every streamed request."""

    def __init__(self, app, api_key: Optional[str], max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        # The route's own path: an app mounted in another (`outer.mount("/llm", build_app(...))`)
        # sees the mount's prefix in "path" and again in "root_path".
        path, root = scope["path"], scope.get("root_path", "")
        route = path[len(root):] if root and path.startswith(root) else path
        # Constant time: how long the comparison takes says nothing about the key.
        if self.expected is not None and route not in OPEN_ROUTES and \
                not hmac.compare_digest(headers.get("authorization", b""), self.expected):
            body = error_body("Incorrect API key provided.", "authentication_error", None, "invalid_api_key")
            return await _reply(send, 401, body)
        size = headers.get("content-length", b"").decode("latin-1") or None
        limit = self.max_body_bytes
        too_big = error_body(f"the request body is over the limit of {limit} bytes", "invalid_request_error", None,
                             "request_too_large")
        if size is not None and (not size.isdigit() or int(size) > limit):
            return await _reply(send, 413, too_big)
        seen = 0

        async def limited_receive():
            # A chunked body has no length up front: count it as it comes.
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge()
            return msg

        started = False

        async def tracked_send(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await _reply(send, 413, too_big)
        except Exception as e:  # the last line of defence: never a traceback page
            # Nor a silent one: the operator's log gets the traceback (no client should meet this).
            logging.getLogger("horae.serve").exception("internal error answering %s %s", scope.get("method"), route)
            if not started:
                await _reply(send, 500, error_body(f"internal error: {first_line(e)}", "server_error"))


class _BodyTooLarge(Exception):
    pass


async def _reply(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
