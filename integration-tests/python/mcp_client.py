"""The official MCP Python client against a URL, as one caller; prints one JSON object with what it saw.

usage: mcp_client.py URL [--header NAME=VALUE ...] [--mode auto|legacy] --call TOOL JSON_ARGS [--call ...]
Output: {"protocol": ..., "tools": [names], "prompts": [names], "calls": [{"tool", "ok", "text"|"error"}]}
"""

import argparse
import asyncio
import json
import sys

from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client


async def run(args) -> dict:
    headers = dict(h.split("=", 1) for h in args.header)
    http = create_mcp_http_client(headers=headers)
    out = {"calls": []}
    async with http:
        transport = streamable_http_client(args.url, http_client=http)
        async with Client(transport, mode=args.mode, cache=None) as client:
            out["protocol"] = client.protocol_version
            out["tools"] = [t.name for t in (await client.list_tools()).tools]
            out["prompts"] = [p.name for p in (await client.list_prompts()).prompts]
            for tool, raw in args.call:
                try:
                    res = await client.call_tool(tool, json.loads(raw))
                    text = " ".join(getattr(c, "text", "") for c in res.content)
                    out["calls"].append({"tool": tool, "ok": not res.is_error, "text": text})
                except Exception as e:  # the SDK raises on JSON-RPC errors
                    code = getattr(getattr(e, "error", None), "code", None)
                    out["calls"].append({"tool": tool, "ok": False, "error": str(e), "code": code,
                                         "type": type(e).__name__})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--header", action="append", default=[])
    ap.add_argument("--mode", default="auto")
    ap.add_argument("--call", nargs=2, action="append", default=[], metavar=("TOOL", "JSON_ARGS"))
    args = ap.parse_args()
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    sys.exit(main())
