"""Receives events from the simulator with Crownstone's official client (crownstone-sse).

Usage: crownstone_client.py BASE_URL EMAIL PASSWORD ACCESS_TOKEN DATA_EVENTS TIMEOUT_SECONDS

Prints every event the client yields as one JSON line, and exits after DATA_EVENTS events that
are neither pings nor system frames, or with status 3 after TIMEOUT_SECONDS.
"""

import asyncio
import json
import sys

import crownstone_sse.async_client as async_client
from crownstone_sse import CrownstoneSSEAsync


async def receive(email: str, password: str, token: str, wanted: int) -> None:
    received = 0
    async with CrownstoneSSEAsync(
        email, password, access_token=token, reconnection_time=1, project_name="tests"
    ) as client:
        async for event in client:
            if event is None:
                continue
            print(json.dumps(event.data), flush=True)
            if event.type not in ("ping", "system"):
                received += 1
                if received >= wanted:
                    return


def main() -> int:
    base, email, password, token, wanted, timeout = sys.argv[1:7]
    # The client imports these by name, so they are replaced where it reads them.
    async_client.DEFAULT_SSE_ADDR = f"{base}/sse"
    async_client.DEFAULT_CLOUD_ADDR = f"{base}/api"
    try:
        asyncio.run(asyncio.wait_for(receive(email, password, token, int(wanted)), float(timeout)))
    except asyncio.TimeoutError:
        print("timed out", file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
