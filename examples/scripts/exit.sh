#!/bin/sh
# Exits with the code given, or kills itself with a signal when given "signal".
if [ "$1" = signal ]; then kill -9 $$; fi
echo "exiting with $1" >&2
exit "$1"
