#!/bin/sh
# Works for --seconds N (default 300), printing a heartbeat; on SIGTERM it cleans up and exits.
seconds=300
[ "$1" = "--seconds" ] && seconds=$2
trap 'echo "got SIGTERM: cleaning up" >&2; echo "cleanup done"; exit 143' TERM
echo "working for $seconds seconds (pid $$)"
i=0
while [ "$i" -lt "$seconds" ]; do
  sleep 1 &
  wait $!
  i=$((i + 1))
  echo "still working: $i s"
done
echo "done"
