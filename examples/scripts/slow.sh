#!/bin/sh
# Works for $1 seconds (default 60), printing a heartbeat; ignores nothing.
n=${1:-60}
i=0
while [ "$i" -lt "$n" ]; do
  echo "tick $i"
  sleep 1
  i=$((i + 1))
done
