#!/usr/bin/env python3
"""A WebSocket service in lines mode: it greets the client with what the upgrade request said,
then answers every message with its length and its upper-case form.

Enable it in inetd.yaml:
    wsroom:
      listen: 127.0.0.1:8080
      exec: services/wsroom.py
      websocket: {path: /room, origins: [http://localhost:8080]}
Try it: python3 -m websockets ws://127.0.0.1:8080/room?name=ada   (pip install websockets)

No flush() is needed: pyinetd sets PYTHONUNBUFFERED=1 for a websocket: service's programs, so each
print() is one message at once. Each line read is one text message from the client.
"""

import os
import sys

query = os.environ.get("QUERY_STRING", "")
print(f"hello {os.environ.get('REMOTE_ADDR', '?')} ({query or 'no query'})")
for line in sys.stdin:
    text = line.rstrip("\n")
    print(f"{len(text)} {text.upper()}")
