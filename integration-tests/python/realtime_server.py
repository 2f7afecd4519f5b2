"""A mock of OpenAI's Realtime API (WebSocket, `websockets` asyncio server) for meshwarden tests.

Binds 127.0.0.1 on a free port and prints `PORT <n>` on stdout, then serves until killed.
  --input-tokens N   input tokens each `response.done` reports (default 100)
  --output-tokens M  output tokens each `response.done` reports (default 300)
  --fragment         send every `response.done` as three WebSocket frames (text fin=0, continuation fin=0,
                     continuation fin=1, each with a third of the JSON), so a gateway must reassemble
                     messages to read the usage
  --audio-bytes K    before `response.done`, send one `response.output_audio.delta` carrying K random
                     bytes in base64 (a large message the gateway has to let through, not parse)

Per connection: `session.created` at once (model from `?model=`), then for each text message:
  session.update   -> session.updated
  --echo: a response's spoken answer repeats the last user item (transcript deltas of 5 characters,
          audio deltas between them)
  input_audio_buffer.commit -> input_audio_buffer.committed, then
          conversation.item.input_audio_transcription.completed with --transcript (default "hello there")
  conversation.item.create -> conversation.item.created (its texts recorded in /stats "items")
  response.create  -> response.created, response.output_text.delta ("Hello"), [audio delta], response.done
                      `response.metadata.input_tokens` / `output_tokens` (digit strings) override N / M for
                      that response; `response.metadata.hold == "1"` never sends response.done (a response
                      still in progress when the client leaves)
  anything else    -> ignored
permessage-deflate is accepted whenever offered (the websockets default), so `extensions` in /stats shows
whether a gateway in front kept or stripped the client's offer.

`GET /stats` (plain HTTP, same port) answers JSON counters kept across connections: connections,
response_creates_received, responses_done_sent, close_codes_received, extensions, paths (request targets,
query string included).
"""

import argparse
import asyncio
import base64
import itertools
import json
import os
import sys
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request

ARGS: argparse.Namespace
STATS = {
    "connections": 0,
    "response_creates_received": 0,
    "responses_done_sent": 0,
    "close_codes_received": [],
    "extensions": [],
    "paths": [],
    "refused": 0,
    "items": [],
    "commits": 0,
}
# Ids unique across connections, so a test can tell responses of different sessions apart.
EVENT_IDS = itertools.count(1)
RESPONSE_IDS = itertools.count(1)


def event(kind: str, **fields) -> dict:
    return {"type": kind, "event_id": f"event_{next(EVENT_IDS)}", **fields}


def metadata_int(metadata: dict, key: str, default: int) -> int:
    # Realtime metadata values are strings; anything that is not plain digits keeps the default.
    value = metadata.get(key)
    return int(value) if isinstance(value, str) and value.isdigit() else default


def process_request(connection: ServerConnection, request: Request):
    # Plain HTTP on the WebSocket port: /stats for the test; any other plain request gets a 404 here
    # rather than websockets' 426 and its logged traceback.
    if urlsplit(request.path).path.endswith("/refused/realtime"):
        # An upstream that refuses the upgrade, as OpenAI does a bad key: 401 with a JSON error.
        STATS["refused"] += 1
        body = json.dumps({"error": {"type": "invalid_request_error", "code": "invalid_api_key",
                                     "message": "Incorrect API key provided."}})
        return connection.respond(HTTPStatus.UNAUTHORIZED, body + "\n")
    if request.headers.get("Upgrade") is not None:
        return None  # a WebSocket handshake: carry on
    if urlsplit(request.path).path != "/stats":
        return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
    response = connection.respond(HTTPStatus.OK, json.dumps(STATS) + "\n")
    del response.headers["Content-Type"]  # respond() sets text/plain
    response.headers["Content-Type"] = "application/json"
    return response


async def send_in_three_frames(ws: ServerConnection, message: str) -> None:
    # One text message as text(fin=0), continuation(fin=0), continuation(fin=1), each carrying a third.
    # ws.send(iterable) would end with an extra, empty fin=1 frame (4 frames for 3 pieces); writing the
    # frames through the protocol, as send() does internally, keeps exactly the shape of a real
    # fragmenting server.
    data = message.encode()
    third = len(data) // 3
    async with ws.send_context():
        ws.protocol.send_text(data[:third], fin=False)
    async with ws.send_context():
        ws.protocol.send_continuation(data[third:2 * third], fin=False)
    async with ws.send_context():
        ws.protocol.send_continuation(data[2 * third:], fin=True)


async def send_echo(ws: ServerConnection, where: dict, text: str) -> list:
    # A spoken answer that repeats the user's last message: its transcript in 5-character deltas with an
    # audio delta between each two, as a voice model streams them (a value the gateway masked comes back
    # as its placeholder, cut across deltas).
    for i in range(0, len(text), 5):
        await ws.send(json.dumps(event("response.output_audio_transcript.delta", **where, delta=text[i:i + 5])))
        await ws.send(json.dumps(event("response.output_audio.delta", **where, delta="AAAA")))
    await ws.send(json.dumps(event("response.output_audio_transcript.done", **where, transcript=text)))
    return [{"type": "message", "role": "assistant", "content": [{"type": "output_audio", "transcript": text}]}]


async def send_response(ws: ServerConnection, create: dict, last_item: str | None = None) -> None:
    body = create.get("response") if isinstance(create.get("response"), dict) else {}
    metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    n_in = metadata_int(metadata, "input_tokens", ARGS.input_tokens)
    n_out = metadata_int(metadata, "output_tokens", ARGS.output_tokens)
    resp_id = f"resp_{next(RESPONSE_IDS)}"
    where = {"response_id": resp_id, "item_id": f"item_{resp_id}", "output_index": 0, "content_index": 0}

    await ws.send(json.dumps(event("response.created", response={
        "id": resp_id, "object": "realtime.response", "status": "in_progress", "output": [], "usage": None})))
    await ws.send(json.dumps(event("response.output_text.delta", **where, delta="Hello")))
    if metadata.get("hold") == "1":
        return  # left in progress on purpose: the client leaves before the usage arrives
    if ARGS.audio_bytes:
        audio = base64.b64encode(os.urandom(ARGS.audio_bytes)).decode()
        await ws.send(json.dumps(event("response.output_audio.delta", **where, delta=audio)))

    output = [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]}]
    if ARGS.echo and last_item:
        output = await send_echo(ws, where, last_item)
    done = json.dumps(event("response.done", response={
        "id": resp_id,
        "object": "realtime.response",
        "status": "completed",
        "output": output,
        "usage": {
            "total_tokens": n_in + n_out,
            "input_tokens": n_in,
            "output_tokens": n_out,
            "input_token_details": {"cached_tokens": 0, "text_tokens": n_in, "audio_tokens": 0},
            "output_token_details": {"text_tokens": n_out, "audio_tokens": 0},
        },
    }))
    if ARGS.fragment:
        await send_in_three_frames(ws, done)
    else:
        await ws.send(done)
    STATS["responses_done_sent"] += 1


async def handler(ws: ServerConnection) -> None:
    STATS["connections"] += 1
    offered = ws.request.headers.get_all("Sec-WebSocket-Extensions")
    STATS["extensions"].append(", ".join(offered) if offered else None)
    STATS["paths"].append(ws.request.path)
    model = parse_qs(urlsplit(ws.request.path).query).get("model", [None])[0]
    session = {"id": "sess_1", "object": "realtime.session", "model": model}
    try:
        await ws.send(json.dumps(event("session.created", session=session)))
        async for message in ws:
            if not isinstance(message, str):
                continue
            try:
                received = json.loads(message)
            except ValueError:
                continue
            if not isinstance(received, dict):
                continue
            if received.get("type") == "session.update":
                update = received.get("session") if isinstance(received.get("session"), dict) else {}
                session = {**session, **update, "id": "sess_1", "object": "realtime.session"}
                await ws.send(json.dumps(event("session.updated", session=session)))
            elif received.get("type") == "response.create":
                STATS["response_creates_received"] += 1
                await send_response(ws, received, STATS["items"][-1] if STATS["items"] else None)
            elif received.get("type") == "input_audio_buffer.commit":
                # The user's speech committed: its transcript (--transcript), as input audio
                # transcription reports it.
                STATS["commits"] += 1
                await ws.send(json.dumps(event("input_audio_buffer.committed", item_id="item_audio")))
                await ws.send(json.dumps(event("conversation.item.input_audio_transcription.completed",
                                               item_id="item_audio", content_index=0, transcript=ARGS.transcript)))
            elif received.get("type") == "conversation.item.create":
                # What a gateway let through: the texts of every item, for the test to check.
                item = received.get("item") if isinstance(received.get("item"), dict) else {}
                parts = item.get("content") if isinstance(item.get("content"), list) else []
                STATS["items"].append(" ".join(p.get("text", "") for p in parts if isinstance(p, dict)))
                await ws.send(json.dumps(event("conversation.item.created", item=item)))
    except ConnectionClosed:
        pass  # an abrupt end is a close code to record too, not an error
    # The connection is only CLOSED (and close_code set: the peer's code, 1005 without one, 1006 for
    # a dropped TCP connection) once the closing handshake is over.
    await ws.wait_closed()
    STATS["close_codes_received"].append(ws.close_code)


async def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--input-tokens", type=int, default=100)
    ap.add_argument("--output-tokens", type=int, default=300)
    ap.add_argument("--fragment", action="store_true")
    ap.add_argument("--echo", action="store_true")
    ap.add_argument("--transcript", default="hello there")
    ap.add_argument("--audio-bytes", type=int, default=0)
    ARGS = ap.parse_args()
    # compression="deflate" is the default, spelled out: the server must accept an offer when one arrives.
    async with serve(handler, "127.0.0.1", 0, process_request=process_request, compression="deflate",
                     max_size=None) as server:
        print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
