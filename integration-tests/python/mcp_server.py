"""A real MCP server (official `mcp` SDK, MCPServer = FastMCP, Streamable HTTP) for meshwarden tests.

Binds 127.0.0.1 on a free port and prints `PORT <n>` on stdout, then serves until killed.
  --json         answer with application/json instead of SSE streams
  --stateless    no sessions
  --extra-tools N  register N more tools (tool_000 ...), for list-filtering benchmarks
  --public-cache   mark list and resources/read results `cacheScope: "public"` (2026-07-28 cache hints)
  --model-tool     register `report(options: ReportOptions)`, a tool whose argument is a model (clients
                   may send it as a JSON string, which the SDK parses with `json.loads`)
  --touch-tool     register `touch(uri)`, which announces `notifications/resources/updated` for `uri` to the
                   calling session (a server that announces updates without checking subscriptions)
  --event-store    resumable streams: one in-memory event store for every session (as the SDK hands its
                   `event_store` to every session, and as the SDK's example store keeps events), a 100 ms
                   `retry` for reconnecting clients, and a tool `long_job(name)` that closes its SSE stream
                   before answering (2025-11-25 polling: the client resumes with GET + Last-Event-ID)
  --legacy-sse     serve the legacy HTTP+SSE transport (2024-11-05) instead: `GET /sse` opens the stream, whose
                   first event (`event: endpoint`) names the URI to POST messages to (`/messages/?session_id=…`),
                   and every answer comes on that stream
"""

import argparse
import socket
import sys
from uuid import uuid4

import anyio

import uvicorn
from mcp.server.caching import CacheHint
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.streamable_http import EventMessage, EventStore
from pydantic import BaseModel


class SharedEventStore(EventStore):
    """Every stream's events in one list; a replay finds the stream of the given event id, whichever
    session it belongs to (the SDK's example store does the same)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, object]] = []

    async def store_event(self, stream_id, message):
        event_id = uuid4().hex
        self.events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(self, last_event_id, send_callback):
        index = next((i for i, (e, _, _) in enumerate(self.events) if e == last_event_id), None)
        if index is None:
            return None
        stream_id = self.events[index][1]
        for event_id, stream, message in self.events[index + 1 :]:
            if stream == stream_id and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream_id


class ReportOptions(BaseModel):
    limit: int = 10


def build(
    extra_tools: int,
    public_cache: bool = False,
    model_tool: bool = False,
    touch_tool: bool = False,
    long_job_tool: bool = False,
) -> MCPServer:
    hints = None
    if public_cache:
        public = CacheHint(ttl_ms=60_000, scope="public")
        hints = {m: public for m in ("tools/list", "prompts/list", "resources/list", "resources/templates/list", "resources/read")}
    mcp = MCPServer("meshwarden-test", cache_hints=hints)

    @mcp.tool()
    def search(query: str, limit: int = 10) -> str:
        """Search the catalogue."""
        return f"results for {query} (limit {limit})"

    @mcp.tool()
    def get_weather(city: str) -> str:
        """Weather for a city."""
        return f"sunny in {city}"

    @mcp.tool()
    def delete_file(path: str, env: str = "dev") -> str:
        """Delete a file."""
        return f"deleted {path} in {env}"

    @mcp.tool()
    def ledger_read(account: str) -> str:
        """Read a ledger account."""
        return f"balance of {account}: 42"

    @mcp.tool()
    def transfer(amount: float, currency: str = "EUR") -> str:
        """Transfer money."""
        return f"transferred {amount} {currency}"

    if model_tool:

        @mcp.tool()
        def report(options: ReportOptions) -> str:
            """A report."""
            return f"report (limit {options.limit})"

    for i in range(extra_tools):
        name = f"tool_{i:03d}"

        def make(n: str):
            def f(x: str = "") -> str:
                return f"{n}:{x}"

            f.__name__ = n
            f.__doc__ = f"Generated tool {n} with a description long enough to look like a real one."
            return f

        mcp.tool(name=name)(make(name))

    if touch_tool:

        @mcp.tool()
        async def touch(uri: str, ctx: Context) -> str:
            """Announce an update of a resource."""
            await ctx.session.send_resource_updated(uri)
            return "touched"

    if long_job_tool:

        @mcp.tool()
        async def long_job(name: str, ctx: Context) -> str:
            """A long job: its SSE stream is closed before the answer, which the client fetches on resume."""
            await ctx.close_sse_stream()
            await anyio.sleep(0.3)
            return f"job {name} done"

    @mcp.prompt()
    def greet(name: str) -> str:
        """Greeting prompt."""
        return f"Say hello to {name}."

    @mcp.prompt()
    def admin_prompt() -> str:
        """Admin-only prompt."""
        return "secret instructions"

    @mcp.resource("file:///public/readme")
    def readme() -> str:
        return "public readme"

    @mcp.resource("file:///private/keys")
    def keys() -> str:
        return "private keys"

    @mcp.resource("file:///public/{name}")
    def public_file(name: str) -> str:
        return f"public file {name}"

    @mcp.resource("db://{table}")
    def table(table: str) -> str:
        return f"table {table}"

    return mcp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--stateless", action="store_true")
    ap.add_argument("--extra-tools", type=int, default=0)
    ap.add_argument("--public-cache", action="store_true")
    ap.add_argument("--model-tool", action="store_true")
    ap.add_argument("--touch-tool", action="store_true")
    ap.add_argument("--legacy-sse", action="store_true")
    ap.add_argument("--event-store", action="store_true")
    args = ap.parse_args()
    server = build(args.extra_tools, args.public_cache, args.model_tool, args.touch_tool, args.event_store)
    if args.legacy_sse:
        app = server.sse_app()
    elif args.event_store:
        app = server.streamable_http_app(event_store=SharedEventStore(), retry_interval=100)
    else:
        app = server.streamable_http_app(json_response=args.json, stateless_http=args.stateless)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_level="warning")
    server = uvicorn.Server(config)
    server.run(sockets=[sock])


if __name__ == "__main__":
    sys.exit(main())
