#!/bin/bash
# Remove lprd installed by packaging/install.sh. Keeps /etc/lprd (config) and /var/lib/lprd
# (outbox, watchlist) and the user lprd unless --purge is given.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: sudo packaging/uninstall.sh [--purge] [--no-systemctl] [--root DIR]

  --purge         also delete /etc/lprd, /var/lib/lprd (undelivered events, the watchlist)
                  and the user lprd
  --no-systemctl  do not stop, disable or daemon-reload
  --root DIR      act on a tree staged with install.sh --root DIR (also: LPRD_ROOT=DIR)
EOF
}

ROOT="${LPRD_ROOT:-}"
PURGE=0 DO_SYSTEMCTL=1
while [ $# -gt 0 ]; do
    case "$1" in
        --purge) PURGE=1 ;;
        --no-systemctl) DO_SYSTEMCTL=0 ;;
        --root) ROOT="${2:?--root needs a directory}"; shift ;;
        --root=*) ROOT="${1#--root=}" ;;
        -h|--help) usage; exit 0 ;;
        *) echo "uninstall.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

say() { echo "lprd uninstall: $*"; }

ROOT="${ROOT%/}"
if [ -n "$ROOT" ]; then
    [ -d "$ROOT" ] || { echo "uninstall.sh: no such directory $ROOT" >&2; exit 1; }
    ROOT="$(cd "$ROOT" && pwd)"
    [ "$ROOT" != / ] || ROOT=""
fi
if [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then
    echo "uninstall.sh: run as root (sudo)" >&2
    exit 1
fi

UNIT="$ROOT/usr/local/lib/systemd/system/lprd.service"

if [ "$DO_SYSTEMCTL" = 1 ]; then
    if [ -n "$ROOT" ]; then
        [ ! -e "$UNIT" ] || systemctl --root="$ROOT" disable lprd.service || true
    elif [ -d /run/systemd/system ]; then
        say "stopping and disabling lprd"
        systemctl disable --now lprd.service 2>/dev/null || true
    fi
fi

say "removing the program, models and unit"
rm -rf "$ROOT/opt/lprd" "$ROOT/usr/share/lprd"
rm -f "$UNIT" "$ROOT/usr/local/lib/sysusers.d/lprd.conf"
rm -f "$ROOT/etc/systemd/system/multi-user.target.wants/lprd.service"

if [ "$PURGE" = 1 ]; then
    say "purging the config, the data and the user lprd"
    rm -rf "$ROOT/etc/lprd" "$ROOT/var/lib/lprd" "$ROOT/var/lib/private/lprd"
    rm -rf "$ROOT/etc/systemd/system/lprd.service.d"
    if grep -q '^lprd:' "$ROOT/etc/passwd" 2>/dev/null; then
        userdel ${ROOT:+--prefix "$ROOT"} lprd || say "warning: could not remove the user lprd"
    fi
    if grep -q '^lprd:' "$ROOT/etc/group" 2>/dev/null; then
        groupdel ${ROOT:+--prefix "$ROOT"} lprd || say "warning: could not remove the group lprd"
    fi
else
    [ ! -d "$ROOT/etc/lprd" ] || say "kept $ROOT/etc/lprd (config)"
    [ ! -d "$ROOT/var/lib/lprd" ] || say "kept $ROOT/var/lib/lprd (outbox, watchlist)"
    say "kept the user lprd; 'uninstall.sh --purge' removes all three"
fi

if [ "$DO_SYSTEMCTL" = 1 ] && [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl reset-failed lprd.service 2>/dev/null || true
fi
say "done"
