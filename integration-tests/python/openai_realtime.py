"""The official OpenAI Python SDK's Realtime client (WebSocket) against a gateway or realtime_server.py.

usage: openai_realtime.py <ws_base_url> <n_responses> [--metadata-output-tokens M] [--hold] [--deflate] [--say TEXT]...

Connects once (`AsyncOpenAI(websocket_base_url=...).realtime.connect(model="gpt-realtime")`: the SDK
appends `/realtime?model=gpt-realtime` to the base URL), then up to n times sends `response.create` and
reads events until `response.done`, an `error` event or the connection closing (the first two end the
session). Then it tries to connect a second time and records whether the handshake was refused.
  --metadata-output-tokens M  send `response.metadata.output_tokens = "M"` (realtime_server.py reports M)
  --hold      the n-th `response.create` carries `metadata.hold = "1"`: the client waits for its text
              delta, then leaves with that response still in progress (no `response.done`)
  --deflate   offer permessage-deflate (the SDK offers no compression by default)
  --say TEXT  (repeatable) the i-th response is preceded by a user message item with the i-th TEXT
  --speak     each response is preceded by audio appended and committed (the server transcribes it)

Prints one JSON object:
  {"first":  null, or the refusal (shape of "second") if the first handshake was refused,
   "done":   [usage of each response.done, in order],
   "transcripts": [{"deltas": the spoken answer's transcript joined from its deltas, "done": the one in
                    response.done}, per response],
   "error":  the `error` event's "error" object, or null,
   "closed": {"code", "reason"} if the server side closed the session (code null: no close frame), or null;
             after an `error` event the session is read on until it closes (or TIMEOUT), so both are seen,
   "timed_out": true if some event did not arrive within 10 s,
   "second": {"status", "retry_after", "retry_after_ms", "remaining", "body"}}
"second" has status 101 (and the handshake's headers, body null) when the second connection was accepted,
and status null with "error" if it failed without an HTTP answer. Exits 0 unless something unexpected
happens (then a traceback on stderr and exit 1).
"""

import argparse
import asyncio
import json
import sys
import traceback

import openai
from openai import omit
from websockets.exceptions import ConnectionClosed, InvalidStatus

# Every wait is bounded: a gateway that swallows an event must fail the test, not hang it.
TIMEOUT = 10.0
MODEL = "gpt-realtime"


def handshake_answer(status, headers, body) -> dict:
    return {
        "status": status,
        "retry_after": headers.get("retry-after"),
        "retry_after_ms": headers.get("retry-after-ms"),
        "remaining": headers.get("x-ratelimit-remaining-tokens"),
        "body": body or None,
    }


def refusal(exc: BaseException) -> dict | None:
    """The HTTP answer of a refused handshake, or None if `exc` is not one. This SDK lets websockets'
    InvalidStatus through; other versions wrap it (an APIStatusError, or a cause/context chain)."""
    while exc is not None:
        if isinstance(exc, InvalidStatus):
            r = exc.response
            return handshake_answer(r.status_code, r.headers, r.body.decode("utf-8", "replace") if r.body else None)
        if isinstance(exc, openai.APIStatusError):
            r = exc.response
            return handshake_answer(r.status_code, r.headers, r.text)
        exc = exc.__cause__ or exc.__context__
    return None


def connect(client: openai.AsyncOpenAI, deflate: bool):
    # The SDK sets max_size=None and, with it, compression=None: no permessage-deflate offer unless asked.
    options = {"compression": "deflate"} if deflate else {}
    return client.realtime.connect(model=MODEL, websocket_connection_options=options)


def close_of(exc: BaseException) -> dict:
    """The close frame the other side sent (code None: the TCP connection just ended). The SDK wraps the
    websockets exception when the close left queued messages unsent; the websockets close is the cause."""
    rcvd = getattr(exc, "rcvd", None) or getattr(exc.__cause__, "rcvd", None)
    return {"code": rcvd.code if rcvd else None, "reason": rcvd.reason if rcvd else None}


async def read_to_the_end(conn, result: dict) -> None:
    """After an `error` event or a send refused by a closed connection: the events still buffered (a
    gateway's `error` event arrives with its close frame) and then the close itself."""
    while True:
        try:
            event = await asyncio.wait_for(conn.recv(), TIMEOUT)
        except (ConnectionClosed, openai.WebSocketConnectionClosedError) as exc:
            result["closed"] = close_of(exc)
            return
        if event.type == "error" and result["error"] is None:
            result["error"] = event.error.to_dict()


async def session(client: openai.AsyncOpenAI, args: argparse.Namespace, result: dict) -> None:
    try:
        conn = await asyncio.wait_for(connect(client, args.deflate).enter(), TIMEOUT)
    except Exception as exc:
        # A gateway may refuse the very first handshake (budget already spent): a result, not a crash.
        result["first"] = refusal(exc)
        if result["first"] is None:
            raise
        return
    try:
        for i in range(args.n_responses):
            held = args.hold and i == args.n_responses - 1
            metadata = {}
            if args.metadata_output_tokens is not None:
                metadata["output_tokens"] = str(args.metadata_output_tokens)
            if held:
                metadata["hold"] = "1"
            try:
                if args.speak:
                    # Speech: a piece of (silent) audio, committed as the user's turn.
                    await conn.input_audio_buffer.append(audio="AAAAAAAA")
                    await conn.input_audio_buffer.commit()
                if i < len(args.say):
                    # A user message before the response, as a text chat over Realtime sends one.
                    await conn.conversation.item.create(item={
                        "type": "message", "role": "user",
                        "content": [{"type": "input_text", "text": args.say[i]}]})
                await conn.response.create(response={"metadata": metadata} if metadata else omit)
            except (ConnectionClosed, openai.WebSocketConnectionClosedError):
                await read_to_the_end(conn, result)
                return
            deltas = ""
            while True:
                # recv() is documented as safe to cancel, so wait_for loses nothing.
                event = await asyncio.wait_for(conn.recv(), TIMEOUT)
                if event.type == "response.output_audio_transcript.delta":
                    deltas += event.delta
                if event.type == "response.done":
                    usage = event.response.usage
                    result["done"].append(usage.to_dict() if usage is not None else None)
                    # What the client heard: the transcript from its deltas, and the one in response.done.
                    full = [c.transcript for o in (event.response.output or []) for c in (getattr(o, "content", None) or [])
                            if getattr(c, "transcript", None)]
                    result["transcripts"].append({"deltas": deltas, "done": " ".join(full)})
                    break
                if event.type == "error":
                    result["error"] = event.error.to_dict()
                    await read_to_the_end(conn, result)
                    return
                if held and event.type == "response.output_text.delta":
                    return  # the response is in progress: leave now
    except (ConnectionClosed, openai.WebSocketConnectionClosedError) as exc:
        result["closed"] = close_of(exc)
    except asyncio.TimeoutError:
        result["timed_out"] = True
    finally:
        # A normal close (1000) from our side; harmless if the connection is already closed.
        await asyncio.wait_for(conn.close(), TIMEOUT)


async def second_handshake(client: openai.AsyncOpenAI, deflate: bool) -> dict:
    try:
        conn = await asyncio.wait_for(connect(client, deflate).enter(), TIMEOUT)
    except Exception as exc:
        refused = refusal(exc)
        if refused is not None:
            return refused
        # No HTTP answer at all (reset, timeout...): report it rather than crash, a gateway test may want it.
        return {**handshake_answer(None, {}, None), "error": f"{type(exc).__name__}: {exc}"}
    # Accepted. The SDK does not expose the 101 response; its websockets connection does.
    response = getattr(getattr(conn, "_connection", None), "response", None)
    answer = handshake_answer(101, response.headers if response is not None else {}, None)
    await asyncio.wait_for(conn.close(), TIMEOUT)
    return answer


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ws_base_url")
    ap.add_argument("n_responses", type=int)
    ap.add_argument("--metadata-output-tokens", type=int)
    ap.add_argument("--hold", action="store_true")
    ap.add_argument("--deflate", action="store_true")
    ap.add_argument("--say", action="append", default=[])
    ap.add_argument("--speak", action="store_true")
    args = ap.parse_args()
    # max_retries only concerns HTTP calls; realtime reconnection is off unless on_reconnecting is given.
    client = openai.AsyncOpenAI(api_key="sk-test", websocket_base_url=args.ws_base_url, max_retries=0)
    result = {"first": None, "done": [], "transcripts": [], "error": None, "closed": None, "timed_out": False,
              "second": None}
    await session(client, args, result)
    result["second"] = await second_handshake(client, args.deflate)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
