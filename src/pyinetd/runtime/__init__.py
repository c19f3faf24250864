"""The parent's loop and its parts: a connection's way from accept to a process and back.

``loop`` (selector, timers, signal wake-up), ``services`` and ``listeners`` (bind, adopt,
pause by limits), ``connections`` and ``stages`` (accept, datagrams, wait mode, the pre-service
stages), ``admission`` (the pure ``admit()``), ``arrival`` (one connection as one value),
``children`` and ``reaper`` (the children table, reaping), ``sessions`` (built-ins in the loop),
``warm`` (the zygotes of this process), ``fronts``/``frontproc``/``frontpath`` (the TLS,
redirect and WebSocket fronts, seen from the parent), ``workers``, ``control``, ``metrics``,
``stderrlog``, ``systemd``, ``agent`` (HAProxy's agent-check), ``upgrade`` (exec in place),
``pidfile``. Imports the configuration, spawn, protocols, sandbox and zygote packages; none of
them imports it.
"""
