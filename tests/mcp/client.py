"""A client of the official MCP Python SDK (PyPI `mcp`), for tests/mcp.rs: connects to
`agentd mcp` over stdio (`stdio AGENTD MANIFEST AUDIT_LOG`) or Streamable HTTP (`http URL`),
lists the tools, calls `read` on the path given last, and prints what it got as JSON."""

import asyncio
import json
import sys

from mcp import Client, StdioServerParameters


def dump(result):
    return result.model_dump(mode="json", by_alias=True, exclude_none=True)


async def main():
    mode = sys.argv[1]
    if mode == "stdio":
        agentd, manifest, audit_log, path = sys.argv[2:6]
        server = StdioServerParameters(
            command=agentd, args=["mcp", "--manifest", manifest, "--audit-log", audit_log]
        )
    else:
        server, path = sys.argv[2:4]
    async with Client(server) as client:
        tools = await client.list_tools()
        listed = dump(tools)["tools"]
        inside = await client.call_tool("read", {"path": path})
        outside = await client.call_tool("read", {"path": "/etc/shadow"})
        print(json.dumps({"tools": listed, "inside": dump(inside), "outside": dump(outside)}))


asyncio.run(main())
