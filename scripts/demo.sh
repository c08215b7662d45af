#!/usr/bin/env bash
# The demo on a fresh Debian machine: installs what lprd needs, starts a Mosquitto broker, runs
# `lprd run --once` on the demo clip (config/demo.yaml) and prints every MQTT message it publishes.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
NEED=(python3 python3-venv mosquitto mosquitto-clients)
MISSING=()
for p in "${NEED[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || MISSING+=("$p"); done
if [ "${#MISSING[@]}" -gt 0 ]; then
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${MISSING[@]}"
fi

VENV="${LPRD_VENV:-.venv}"
if [ ! -x "$VENV/bin/lprd" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e .
fi

PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

# config/demo.yaml publishes to localhost:1883: use the broker there, or start one.
if ! (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null; then
  # Debian installs the broker in /usr/sbin, which is not on a normal user's PATH
  BROKER=$(command -v mosquitto || echo /usr/sbin/mosquitto)
  "$BROKER" -p 1883 >/dev/null 2>&1 &
  PIDS+=($!)
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null && break; sleep 0.1; done
  if ! (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null; then
    echo "could not start an MQTT broker ($BROKER) on localhost:1883" >&2
    exit 1
  fi
fi

echo "== MQTT messages under lprd/# (topic, then payload) =="
mosquitto_sub -h localhost -p 1883 -v -t 'lprd/#' &
PIDS+=($!)
sleep 0.5
"$VENV/bin/lprd" --config config/demo.yaml run --once
sleep 1  # let mosquitto_sub print the last messages
