#!/usr/bin/env python3
"""An HTTP/1.0 "hello": reads the request line and headers, answers with a small page.

Enable it in inetd.yaml:
    hello: {listen: 127.0.0.1:8080, exec: services/http_hello.py, warm: true}
Try it: curl http://127.0.0.1:8080/anything
"""

import os
import sys

request = sys.stdin.buffer.readline().decode("latin-1").split()
while sys.stdin.buffer.readline() not in (b"\r\n", b"\n", b""):
    pass  # skip the headers
path = request[1] if len(request) > 1 else "/"
body = f"hello from pyinetd, {os.environ.get('REMOTE_ADDR', '?')}; you asked for {path}\n"
sys.stdout.buffer.write(
    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n"
    + f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
)
