"""A real A2A agent (official `a2a-sdk`, JSON-RPC binding, v1.0 with v0.3 compatibility) for meshwarden tests.

Binds 127.0.0.1 on a free port, prints `PORT <n>`, serves until killed. JSON-RPC at /a2a, agent card at
/.well-known/agent-card.json (and the pre-0.3 /.well-known/agent.json, served with the
`Cache-Control: public, max-age=3600` the a2a-sdk suggests) with three skills (sql, web-search, payments);
both send the SDK's `ETag` and answer a matching `If-None-Match` with 304; /static/agent-card.json serves
the same card as a file, honouring `Range`; the HTTP+JSON binding under /rest. The extended card
(GetExtendedAgentCard) adds a fourth, ops-console. The agent echoes the text it receives: as a message,
or, when the text starts with `task`, as the artifact of a task (completed; `task-wait` leaves it
input-required, so that it can be continued, cancelled and read later). It keeps a memory per context,
as agents keep a conversation's state under its `contextId`: `remember <text>` stores the text in the
message's context, `recall` answers what that context holds.
"""

import json
import socket
import sys
import tempfile

import uvicorn
from a2a.helpers.proto_helpers import get_message_text, new_task_from_user_message, new_text_message, new_text_part
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes, create_rest_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import AgentCapabilities, AgentCard, AgentInterface, AgentSkill
from starlette.applications import Starlette
from starlette.responses import FileResponse
from starlette.routing import Route


class Echo(AgentExecutor):
    def __init__(self) -> None:
        self.memory: dict[str, list[str]] = {}

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        text = get_message_text(context.message) if context.message else ""
        if text.startswith("remember ") or text == "recall":
            notes = self.memory.setdefault(context.context_id, [])
            if text == "recall":
                answer = "memory: " + "; ".join(notes)
            else:
                notes.append(text.removeprefix("remember "))
                answer = "noted"
            await event_queue.enqueue_event(new_text_message(answer, context_id=context.context_id))
            return
        if not text.startswith("task") and context.current_task is None:
            await event_queue.enqueue_event(new_text_message(f"echo: {text}", context_id=context.context_id))
            return
        task = context.current_task
        if task is None:
            task = new_task_from_user_message(context.message)
            await event_queue.enqueue_event(task)
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        await updater.add_artifact([new_text_part(f"echo: {text}")])
        if text.startswith("task-wait"):
            await updater.requires_input()
        else:
            await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        if context.current_task is None:
            raise NotImplementedError
        await TaskUpdater(event_queue, context.current_task.id, context.current_task.context_id).cancel()


def main() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    card = AgentCard(
        name="meshwarden-test-agent",
        description="echo agent",
        version="1.0.0",
        supported_interfaces=[AgentInterface(url=f"http://127.0.0.1:{port}/a2a", protocol_binding="JSONRPC", protocol_version="1.0")],
        capabilities=AgentCapabilities(streaming=True, extended_agent_card=True),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=[
            AgentSkill(id="sql", name="SQL", description="query databases", tags=["data"]),
            AgentSkill(id="web-search", name="Web search", description="search the web", tags=["web"]),
            AgentSkill(id="payments", name="Payments", description="move money", tags=["finance"]),
        ],
    )
    extended = AgentCard()
    extended.CopyFrom(card)
    extended.skills.append(AgentSkill(id="ops-console", name="Ops console", description="run ops", tags=["ops"]))
    handler = DefaultRequestHandler(
        agent_executor=Echo(), task_store=InMemoryTaskStore(), agent_card=card, extended_agent_card=extended
    )
    # The card as a static file too (as a web server would serve it: honouring `Range`).
    static_card = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump(agent_card_to_dict(card), static_card)
    static_card.close()

    async def static(_request):
        return FileResponse(static_card.name, media_type="application/json")

    routes = (
        [Route("/static/agent-card.json", static)]
        + create_agent_card_routes(card)
        + create_agent_card_routes(card, card_url="/.well-known/agent.json", cache_control="public, max-age=3600")
        + create_jsonrpc_routes(handler, "/a2a", enable_v0_3_compat=True)
        # The HTTP+JSON (REST) binding too, under /rest (`POST /rest/message:send`, `GET /rest/tasks/{id}`).
        + create_rest_routes(handler, path_prefix="/rest")
    )
    app = Starlette(routes=routes)
    print(f"PORT {port}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    sys.exit(main())
