"""A misbehaving MCP server (stdio, standard library only), for tests/mcp.rs: it answers
initialize and tools/list, then on tools/call `crash` exits, `garbage` prints a line that is
not JSON-RPC and exits, and `slow` sleeps a minute (for cancellation)."""

import json
import sys
import time

TOOLS = [
    {"name": n, "description": n, "inputSchema": {"type": "object", "properties": {}}}
    for n in ("crash", "garbage", "slow")
]


def answer(msg_id, result):
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": msg_id, "result": result}) + "\n")
    sys.stdout.flush()


for line in sys.stdin:
    msg = json.loads(line)
    method = msg.get("method")
    if method == "initialize":
        answer(msg["id"], {
            "protocolVersion": msg["params"]["protocolVersion"],
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "flaky", "version": "1"},
        })
    elif method == "tools/list":
        answer(msg["id"], {"tools": TOOLS})
    elif method == "tools/call":
        name = msg["params"]["name"]
        if name == "crash":
            sys.exit(3)
        if name == "garbage":
            print("this is not JSON-RPC", flush=True)
            sys.exit(0)
        time.sleep(60)
    elif "id" in msg:
        answer(msg["id"], {})
