#!/bin/sh
# Prints numbered lines: count.sh [--count N] [--delay SECONDS]; COUNT_PREFIX prefixes each line.
count=5
delay=0.5
while [ $# -gt 0 ]; do
  case "$1" in
    --count) count=$2; shift 2 ;;
    --delay) delay=$2; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
i=1
while [ "$i" -le "$count" ]; do
  echo "${COUNT_PREFIX:-line} $i of $count"
  i=$((i + 1))
  [ "$i" -le "$count" ] && sleep "$delay"
done
exit 0
