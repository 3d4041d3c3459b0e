"""Server-sent events, one helper for every streaming endpoint: each chunk a `data:` line, then
`[DONE]` (the Responses API's stream: named events, no `[DONE]`); an engine failure after the
stream opened becomes an error event in OpenAI's shape; and however the stream ends (a client
disconnect included), its requests are closed, which aborts the unfinished ones."""

from __future__ import annotations

import json
from typing import AsyncIterator, Callable, List

from fastapi.responses import StreamingResponse

from horae.async_llm import EngineDeadError, RequestDroppedError
from horae.serve.errors import error_body


def sse(obj, named: bool = False) -> str:
    head = f"event: {obj['type']}\n" if named else ""
    return f"{head}data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def sse_response(chunks: AsyncIterator[dict], streams: List, on_error: Callable[[dict], dict] = lambda body: body,
                 named: bool = False) -> StreamingResponse:
    """`chunks` as server-sent events. `named`: the Responses API's stream, each event named by
    its type and no `[DONE]` after the last; `on_error` makes an error body (OpenAI's shape) the
    route's error event."""

    async def events():
        try:
            async for chunk in chunks:
                yield sse(chunk, named)
            if not named:
                yield "data: [DONE]\n\n"
        except EngineDeadError as e:
            yield sse(on_error(error_body(str(e), "server_error", None, getattr(e, "code", "engine_error"))), named)
        except RequestDroppedError as e:
            code = "queue_timeout" if e.reason == "timeout" else "sla_abort"
            yield sse(on_error(error_body(str(e), "server_overloaded", None, code)), named)
        finally:
            for s in streams:
                await s.aclose()  # a disconnect lands here: the requests are aborted

    return StreamingResponse(events(), media_type="text/event-stream")
