#!/bin/sh
# "Who am I": prints what pyinetd told this service about the connection.
# Enable it in inetd.yaml:
#     whoami: {listen: 127.0.0.1:7009, exec: services/whoami.sh}
# Try it: nc -N 127.0.0.1 7009 </dev/null
echo "service:  $PYINETD_SERVICE"
echo "protocol: $PROTO"
echo "you are:  $REMOTE_ADDR port $REMOTE_PORT"
eval "echo \"me:       \$${PROTO}LOCALIP port \$${PROTO}LOCALPORT\""
