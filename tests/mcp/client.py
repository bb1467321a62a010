"""A client of the official MCP Python SDK (PyPI `mcp`), for tests/mcp.rs: connects to
`agentd mcp` over stdio (`stdio AGENTD MANIFEST AUDIT_LOG PATH`) or Streamable HTTP
(`http URL PATH TOKEN`, the token sent as a bearer secret), or to `agentd serve`'s Streamable
HTTP endpoint on its Unix socket (`unix SOCKET AGENT PATH`), lists the tools, calls `read` on
PATH and on /etc/shadow, and prints what it got as JSON."""

import asyncio
import json
import sys

import httpx2

from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client


def dump(result):
    return result.model_dump(mode="json", by_alias=True, exclude_none=True)


async def main():
    mode = sys.argv[1]
    if mode == "stdio":
        agentd, manifest, audit_log, path = sys.argv[2:6]
        server = StdioServerParameters(
            command=agentd, args=["mcp", "--manifest", manifest, "--audit-log", audit_log]
        )
    elif mode == "unix":
        socket, agent, path = sys.argv[2:5]
        http = httpx2.AsyncClient(transport=httpx2.AsyncHTTPTransport(uds=socket), timeout=60)
        server = streamable_http_client(f"http://agentd/mcp/{agent}", http_client=http)
    else:
        url, path, token = sys.argv[2:5]
        http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
        server = streamable_http_client(url, http_client=http)
    async with Client(server) as client:
        tools = await client.list_tools()
        listed = dump(tools)["tools"]
        inside = await client.call_tool("read", {"path": path})
        outside = await client.call_tool("read", {"path": "/etc/shadow"})
        print(json.dumps({"tools": listed, "inside": dump(inside), "outside": dump(outside)}))


asyncio.run(main())
