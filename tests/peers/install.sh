#!/usr/bin/env bash
# Installs what the foreign gRPC servers in this folder need, pinned, from the registries:
#   tests/peers/.venv          Python venv with requirements.txt (grpcio, grpcio-health-checking,
#                              grpcio-tools) for grpc_core_server.py
#   tests/peers/node_modules   `npm ci` from package-lock.json (@grpc/grpc-js, @grpc/proto-loader,
#                              grpc-health-check) for grpc_js_server.js
# python3 with venv, node and npm come from apt-get, only if missing (CI runs as root on Debian).
# Idempotent and quick when nothing changed: each folder keeps a stamp of the file it came from.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"

missing=()
command -v python3 >/dev/null || missing+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if ((${#missing[@]})); then
  echo "tests/peers: installing ${missing[*]} with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The stamp of a folder: the checksum of the file it is installed from, and the runtime's version.
stamp() { printf '%s %s\n' "$(sha256sum "$1" | cut -d' ' -f1)" "$2"; }

py_stamp="$(stamp requirements.txt "$(python3 --version 2>&1)")"
if [[ -x .venv/bin/python && "$(cat .venv/.towline-stamp 2>/dev/null)" == "$py_stamp" ]]; then
  echo "tests/peers/.venv: up to date"
else
  echo "tests/peers/.venv: installing requirements.txt"
  rm -rf .venv
  python3 -m venv .venv
  .venv/bin/pip install --disable-pip-version-check --no-input -q -r requirements.txt
  printf '%s\n' "$py_stamp" >.venv/.towline-stamp
fi
.venv/bin/python -c 'import grpc, grpc_health.v1.health, grpc_tools.protoc'

js_stamp="$(stamp package-lock.json "$(node --version)")"
if [[ -d node_modules && "$(cat node_modules/.towline-stamp 2>/dev/null)" == "$js_stamp" ]]; then
  echo "tests/peers/node_modules: up to date"
else
  echo "tests/peers/node_modules: npm ci"
  # No install scripts: none of these packages needs one (protobufjs's only checks versions).
  npm ci --prefix "$here" --ignore-scripts --no-audit --no-fund --loglevel=error
  printf '%s\n' "$js_stamp" >node_modules/.towline-stamp
fi
node -e 'require("@grpc/grpc-js"); require("@grpc/proto-loader"); require("grpc-health-check")'
echo "tests/peers: grpc-core and grpc-js servers ready"
