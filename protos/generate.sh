#!/usr/bin/env bash
# Regenerates the committed Python stubs from the .proto files (needs grpcio-tools).
# tests/test_protos.py checks that running this changes nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here}
python -m grpc_tools.protoc -I"$here" --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" "$here"/rlhfkit/v1/*.proto
