"""A stateful MCP server (stdio, standard library only), for tests/mcp.rs: `count` adds one to
a counter held in memory and answers "COUNT PID"; `read` answers the first line of a file, or
the error; `slow` sleeps a minute (for cancellation). Run with `lifetime = "session"`, the
counter shows whether calls shared a process."""

import json
import os
import sys
import time

TOOLS = [
    {"name": "count", "description": "count", "inputSchema": {"type": "object", "properties": {}}},
    {
        "name": "read",
        "description": "read",
        "inputSchema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
    },
    {"name": "slow", "description": "slow", "inputSchema": {"type": "object", "properties": {}}},
]


def answer(msg_id, result):
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": msg_id, "result": result}) + "\n")
    sys.stdout.flush()


def text(msg_id, t, error=False):
    answer(msg_id, {"content": [{"type": "text", "text": t}], "isError": error})


count = 0
for line in sys.stdin:
    msg = json.loads(line)
    method = msg.get("method")
    if method == "initialize":
        answer(msg["id"], {
            "protocolVersion": msg["params"]["protocolVersion"],
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "counter", "version": "1"},
        })
    elif method == "tools/list":
        answer(msg["id"], {"tools": TOOLS})
    elif method == "tools/call":
        name = msg["params"]["name"]
        if name == "count":
            count += 1
            text(msg["id"], f"{count} {os.getpid()}")
        elif name == "read":
            try:
                with open(msg["params"]["arguments"]["path"]) as f:
                    text(msg["id"], f.readline())
            except OSError as e:
                text(msg["id"], str(e), error=True)
        else:
            time.sleep(60)
    elif "id" in msg:
        answer(msg["id"], {})
