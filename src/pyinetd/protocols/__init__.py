"""What is spoken in front of a program or instead of one.

``builtins`` (echo, chargen, daytime... in the parent's loop), ``proxyproto`` (the PROXY
header), ``tlsconf`` (TLS contexts and the SSL_* variables), and a service's front process:
``front`` (its loop), ``frontconn`` (a TLS or redirect connection over memory BIOs),
``frontws`` and ``websocket`` (a WebSocket connection on wsproto), ``frontchan`` (the
parent <-> front channel's codec). Nothing here starts a process.
"""
