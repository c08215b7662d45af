#!/bin/bash
# Install or upgrade lprd as a systemd service on Debian/Ubuntu/Raspberry Pi OS: run it again to
# upgrade. Never overwrites an edited /etc/lprd/config.yaml.
set -euo pipefail
# Whatever the caller's umask (027 on hardened boxes, kept by sudo): the service's user must
# read the program and models, or an upgrade leaves a service that cannot start.
umask 022

usage() {
    cat <<'EOF'
Usage: sudo packaging/install.sh [options]

Installs lprd into a virtualenv in /opt/lprd/venv, its models into /usr/share/lprd/models, the
user "lprd", /etc/lprd/config.yaml (from config/config.example.yaml, only if absent or never
edited), /var/lib/lprd and the systemd unit lprd.service (enabled; restarted if it was running).

Options:
  --now               also start (or restart) lprd now
  --no-apt            do not install Debian packages (python3-venv, a compiler, libsystemd-dev)
  --no-systemctl      do not run systemctl (no daemon-reload, enable or restart)
  --no-systemd-python skip systemd-python (lprd then uses its built-in sd_notify client
                      and logs to stderr, which journald still captures)
  --root DIR          stage everything under DIR instead of / (also: LPRD_ROOT=DIR); for tests
                      and image builds (the unit runs the venv's python, which finds the venv
                      wherever it lies; its bin/ scripts are rewritten to name /opt/lprd/venv,
                      so they run once the image is in place).
  --models DIR        model folder to install (default: the repo's models/)
  --python PATH       interpreter for the venv (default: /usr/bin/python3; also LPRD_PYTHON)
  -h, --help          this text

Environment: LPRD_PACKAGE  what pip installs (default: this checkout)
             LPRD_PIP_ARGS extra pip arguments, e.g. "--no-index --find-links /srv/wheels"
EOF
}

REPO="$(cd "$(dirname "$0")/.." && pwd)"
ROOT="${LPRD_ROOT:-}"
PYTHON="${LPRD_PYTHON:-/usr/bin/python3}"
PACKAGE="${LPRD_PACKAGE:-$REPO}"
read -r -a PIP_ARGS <<<"${LPRD_PIP_ARGS:-}"
MODELS_SRC="$REPO/models"
DO_APT=1 DO_SYSTEMCTL=1 DO_SYSTEMD_PY=1 START=0

while [ $# -gt 0 ]; do
    case "$1" in
        --now) START=1 ;;
        --no-apt) DO_APT=0 ;;
        --no-systemctl) DO_SYSTEMCTL=0 ;;
        --no-systemd-python) DO_SYSTEMD_PY=0 ;;
        --root) ROOT="${2:?--root needs a directory}"; shift ;;
        --root=*) ROOT="${1#--root=}" ;;
        --models) MODELS_SRC="${2:?--models needs a directory}"; shift ;;
        --models=*) MODELS_SRC="${1#--models=}" ;;
        --python) PYTHON="${2:?--python needs a path}"; shift ;;
        --python=*) PYTHON="${1#--python=}" ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

say() { echo "lprd install: $*"; }
die() { echo "lprd install: error: $*" >&2; exit 1; }

ROOT="${ROOT%/}"
if [ -n "$ROOT" ]; then
    mkdir -p "$ROOT"
    ROOT="$(cd "$ROOT" && pwd)"
    [ "$ROOT" != / ] || ROOT=""
fi
IS_ROOT=0; [ "$(id -u)" = 0 ] && IS_ROOT=1
if [ -z "$ROOT" ] && [ "$IS_ROOT" = 0 ]; then
    die "run as root (sudo), or stage into a directory with --root DIR"
fi

VENV="$ROOT/opt/lprd/venv"
SHARE="$ROOT/usr/share/lprd"
ETC="$ROOT/etc/lprd"
STATE="$ROOT/var/lib/lprd"
UNIT_DIR="$ROOT/usr/local/lib/systemd/system"  # systemd's place for units not from a .deb
SYSUSERS_DIR="$ROOT/usr/local/lib/sysusers.d"

[ -f "$REPO/packaging/lprd.service" ] || die "run me from an lprd checkout ($REPO)"
[ -f "$REPO/config/config.example.yaml" ] || die "missing $REPO/config/config.example.yaml"
ls "$MODELS_SRC"/*.tflite >/dev/null 2>&1 || die "no *.tflite models in $MODELS_SRC (--models DIR)"

# -- Debian packages: venv, and what building systemd-python needs -------------------------------
if [ "$DO_APT" = 1 ]; then
    [ "$IS_ROOT" = 1 ] || die "--no-apt is needed when not running as root"
    pkgs=(python3 python3-venv procps)  # procps: the unit's ExecReload=/bin/kill
    [ "$DO_SYSTEMD_PY" = 0 ] || pkgs+=(python3-dev gcc pkg-config libsystemd-dev)
    say "installing Debian packages: ${pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${pkgs[@]}" \
        || { apt-get update && apt-get install -y --no-install-recommends "${pkgs[@]}"; }
fi
[ -x "$PYTHON" ] || die "no Python at $PYTHON (--python PATH)"

# -- the user -------------------------------------------------------------------------------------
install -d -m 0755 "$SYSUSERS_DIR" "$ROOT/etc"
install -m 0644 "$REPO/packaging/lprd.sysusers" "$SYSUSERS_DIR/lprd.conf"
if ! grep -q '^lprd:' "$ROOT/etc/passwd" 2>/dev/null; then
    say "creating the system user lprd"
    if command -v systemd-sysusers >/dev/null; then
        systemd-sysusers ${ROOT:+--root="$ROOT"} "$SYSUSERS_DIR/lprd.conf"
    elif [ -z "$ROOT" ]; then
        adduser --system --group --home /var/lib/lprd --no-create-home \
            --shell /usr/sbin/nologin lprd
    else
        die "systemd-sysusers is needed to create the user under --root"
    fi
fi
LPRD_UID="$(awk -F: '$1 == "lprd" {print $3}' "$ROOT/etc/passwd")"
LPRD_GID="$(awk -F: '$1 == "lprd" {print $4}' "$ROOT/etc/passwd")"
[ -n "$LPRD_UID" ] || die "the user lprd was not created"

owned() {  # owned MODE UID:GID PATH...: ownership only when we may set it
    local mode="$1" owner="$2"; shift 2
    chmod "$mode" "$@"
    if [ "$IS_ROOT" = 1 ]; then chown "$owner" "$@"; fi
}

# -- a running daemon is stopped while its code and models are replaced ---------------------------
# A child process restarted in between (a crash, a hang, a reload) would run the new code under
# the old supervisor. It starts again at the end, or from the EXIT trap where the install fails.
LIVE_SYSTEMD=0
if [ "$DO_SYSTEMCTL" = 1 ] && [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then LIVE_SYSTEMD=1; fi
STOPPED=0 COPY=""
on_exit() {
    [ -z "$COPY" ] || rm -rf "$COPY"
    if [ "$STOPPED" = 1 ]; then
        say "the install stopped on an error: starting the stopped lprd again"
        systemctl start lprd.service || say "warning: lprd did not start: journalctl -u lprd"
    fi
}
trap on_exit EXIT
# activating too: a start in progress, or a crash loop between its restarts
if [ "$LIVE_SYSTEMD" = 1 ] && [[ "$(systemctl show -p ActiveState --value lprd.service)" =~ ^(active|activating|reloading)$ ]]; then
    say "stopping lprd while its program and models are replaced"
    systemctl stop lprd.service
    STOPPED=1
fi

# -- the program ----------------------------------------------------------------------------------
if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -c '' 2>/dev/null; then
    say "the venv's interpreter is gone (Python upgraded?): making a new venv"
    rm -rf "$VENV"
fi
# The venv's python links to the system's: after an upgrade of Debian (3.11 -> 3.13) it still
# runs, but the venv's packages sit under the old version's folder and pip is gone.
pyver() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }
if [ -x "$VENV/bin/python" ] && [ -f "$VENV/pyvenv.cfg" ]; then
    made="$(sed -n 's/^version[_a-z]* *= *\([0-9]*\.[0-9]*\).*/\1/p' "$VENV/pyvenv.cfg" | head -n 1)"
    now="$(pyver "$PYTHON")"
    if [ -n "$made" ] && [ -n "$now" ] && [ "$made" != "$now" ]; then
        say "the venv was made with Python $made, the system has $now: making a new venv"
        rm -rf "$VENV"
    fi
fi
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
fi
say "installing lprd from $PACKAGE"
SOURCE="$PACKAGE"
if [ -f "$PACKAGE/pyproject.toml" ]; then  # a folder, as pip tells one from a package name
    # pip builds a source folder in place: as root that left a root-owned build/ and
    # lprd.egg-info/ in the user's checkout, and build/lib's copy of a module since deleted
    # was installed again. Build from a fresh copy of what the package is made of.
    COPY="$(mktemp -d)"
    SOURCE="$COPY"
    PARTS=(lprd setup.cfg pyproject.toml README.md MANIFEST.in models)
    for f in "${PARTS[@]}"; do
        [ -e "$PACKAGE/$f" ] || die "$PACKAGE is not an lprd source folder (no $f)"
    done
    tar -C "$PACKAGE" --exclude=__pycache__ --exclude='*.pyc' --exclude=train_state \
        -cf - "${PARTS[@]}" \
        | tar -C "$SOURCE" -xf -
fi
# --force-reinstall --no-deps for lprd itself: same version number, new code on upgrade.
"$VENV/bin/python" -m pip install --disable-pip-version-check --quiet "${PIP_ARGS[@]}" "$SOURCE"
"$VENV/bin/python" -m pip install --disable-pip-version-check --quiet --force-reinstall --no-deps \
    "${PIP_ARGS[@]}" "$SOURCE"
if [ "$DO_SYSTEMD_PY" = 1 ]; then
    if ! "$VENV/bin/python" -m pip install --disable-pip-version-check --quiet "${PIP_ARGS[@]}" \
            "systemd-python>=235"; then
        say "warning: systemd-python did not build (needs libsystemd-dev, pkg-config, gcc," \
            "python3-dev); lprd uses its own sd_notify client and logs to stderr instead"
    fi
fi

# -- models ---------------------------------------------------------------------------------------
install -d -m 0755 "$SHARE" "$SHARE/models"
new_models="$(mktemp -d "$SHARE/.models.XXXXXX")"
for f in "$MODELS_SRC"/*.tflite "$MODELS_SRC"/*.json; do
    [ -f "$f" ] && install -m 0644 "$f" "$new_models/"
done
chmod 0755 "$new_models"
rm -rf "$SHARE/models.old"
mv "$SHARE/models" "$SHARE/models.old"
mv "$new_models" "$SHARE/models"  # swapped whole: no mix of old and new models
rm -rf "$SHARE/models.old"
say "models: $(cd "$SHARE/models" && echo *.tflite)"

# -- config: never overwrite an edited one --------------------------------------------------------
EXAMPLE="$REPO/config/config.example.yaml"
PRISTINE="$SHARE/config.example.yaml"  # the example as last installed: tells "edited" apart
[ -d "$ETC" ] || install -d -m 0755 "$ETC"  # an existing one keeps the mode its admin gave it
if [ ! -e "$ETC/config.yaml" ]; then
    say "creating $ETC/config.yaml from the example: edit it, then systemctl restart lprd"
    install -m 0640 "$EXAMPLE" "$ETC/config.yaml"
    owned 0640 "0:$LPRD_GID" "$ETC/config.yaml"
elif [ -f "$PRISTINE" ] && cmp -s "$ETC/config.yaml" "$PRISTINE"; then
    if ! cmp -s "$EXAMPLE" "$PRISTINE"; then
        say "updating the unedited $ETC/config.yaml to the new example"
        install -m 0640 "$EXAMPLE" "$ETC/config.yaml"
        owned 0640 "0:$LPRD_GID" "$ETC/config.yaml"
    fi
elif ! cmp -s "$EXAMPLE" "$ETC/config.yaml"; then
    say "keeping your edited $ETC/config.yaml (the new example is $PRISTINE)"
fi
install -m 0644 "$EXAMPLE" "$PRISTINE"

# -- state ----------------------------------------------------------------------------------------
install -d "$STATE"
owned 0750 "$LPRD_UID:$LPRD_GID" "$STATE"
# all of it: a user made again under another uid could not read its outbox and watchlist,
# and systemd's StateDirectory= fixes nothing below a top folder already owned right
if [ "$IS_ROOT" = 1 ]; then chown -R "$LPRD_UID:$LPRD_GID" "$STATE"; fi

# -- the unit -------------------------------------------------------------------------------------
install -d -m 0755 "$UNIT_DIR"
install -m 0644 "$REPO/packaging/lprd.service" "$UNIT_DIR/lprd.service"

# As the service's user where we can: a file only root may read passes as root, and the
# service would then fail on it.
AS_LPRD=()
if [ "$IS_ROOT" = 1 ] && [ -z "$ROOT" ] && command -v runuser >/dev/null; then
    AS_LPRD=(runuser -u lprd --)
fi
CHECK=0
"${AS_LPRD[@]}" "$VENV/bin/python" -P -m lprd --config "$ETC/config.yaml" check-config >/dev/null 2>&1 || CHECK=$?
if [ "$CHECK" = 1 ]; then  # a file source or token not there yet: run starts and retries it
    say "warning: $ETC/config.yaml names files that lprd will retry until they are there:"
    "${AS_LPRD[@]}" "$VENV/bin/python" -P -m lprd --config "$ETC/config.yaml" check-config >&2 || true
elif [ "$CHECK" != 0 ]; then
    say "warning: $ETC/config.yaml does not pass 'lprd check-config' as the service's user;" \
        "the service will not start until it does:"
    "${AS_LPRD[@]}" "$VENV/bin/python" -P -m lprd --config "$ETC/config.yaml" check-config >&2 || true
fi

if [ "$DO_SYSTEMCTL" = 1 ]; then
    if [ -n "$ROOT" ]; then
        systemctl --root="$ROOT" enable lprd.service
    elif [ "$LIVE_SYSTEMD" = 1 ]; then
        systemctl daemon-reload
        systemctl enable lprd.service
        if [ "$CHECK" = 2 ]; then
            # a start would only fail, and systemd would retry it in a loop
            STOPPED=0
            say "not (re)starting lprd: fix $ETC/config.yaml, then 'systemctl restart lprd'"
        elif [ "$START" = 1 ] || [ "$STOPPED" = 1 ] || systemctl -q is-active lprd.service; then
            say "(re)starting lprd"
            STOPPED=0  # from here a failed start is reported by systemctl, not tried again
            systemctl restart lprd.service
        fi
    else
        say "systemd is not running here: the unit is installed but not enabled"
    fi
fi

# Last (pip and the check above ran them here): the venv's scripts name the staging path;
# in the image the venv is /opt/lprd/venv
if [ -n "$ROOT" ]; then
    for f in "$VENV"/bin/*; do
        if [ -f "$f" ] && [ ! -L "$f" ] && head -c 2 "$f" | grep -q '^#!'; then
            sed -i "1s|^#!$VENV/|#!/opt/lprd/venv/|" "$f"
        fi
    done
fi

say "done. Next: edit /etc/lprd/config.yaml, 'systemctl start lprd', 'journalctl -u lprd -f'"
