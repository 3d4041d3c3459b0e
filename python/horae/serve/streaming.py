"""Server-sent events, one helper for every streaming endpoint: each chunk a `data:` line, then
`[DONE]`; an engine failure after the stream opened becomes an error event in OpenAI's shape; and
however the stream ends (a client disconnect included), its requests are closed, which aborts
the unfinished ones."""

from __future__ import annotations

import json
from typing import AsyncIterator, List

from fastapi.responses import StreamingResponse

from horae.async_llm import EngineDeadError, RequestDroppedError
from horae.serve.errors import error_body


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def sse_response(chunks: AsyncIterator[dict], streams: List) -> StreamingResponse:
    async def events():
        try:
            async for chunk in chunks:
                yield sse(chunk)
            yield "data: [DONE]\n\n"
        except EngineDeadError as e:
            yield sse(error_body(str(e), "server_error", None, getattr(e, "code", "engine_error")))
        except RequestDroppedError as e:
            code = "queue_timeout" if e.reason == "timeout" else "sla_abort"
            yield sse(error_body(str(e), "server_overloaded", None, code))
        finally:
            for s in streams:
                await s.aclose()  # a disconnect lands here: the requests are aborted

    return StreamingResponse(events(), media_type="text/event-stream")
