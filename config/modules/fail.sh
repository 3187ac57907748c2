#!/bin/sh
# Writes a few lines to stdout and stderr, then exits with the given code (default 3).
code=${1:-3}
echo "starting the job"
echo "warning: the input looks wrong" >&2
echo "error: giving up with exit code $code" >&2
exit "$code"
