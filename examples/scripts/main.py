"""A tiny module for the examples: prints its arguments, or fails on request."""
import sys

args = sys.argv[1:]
if "--fail" in args:
    print("something went wrong", file=sys.stderr)
    sys.exit(1)
print("module ran with", " ".join(args))
