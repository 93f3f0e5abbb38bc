#!/usr/bin/env bash
# Sets up one server for a class of the course (docs/classroom.md). Run as root, from the course's
# checkout, after `make setup` (the venv):
#
#   sudo scripts/classroom/setup.sh --owner prof --instructors prof,ta1 --students ana,ben,chloe
#
# Options: --state DIR (the hub's folder, default /srv/n2l-classroom), --exchange DIR (nbgrader's
# exchange, default /srv/n2l-classroom/exchange), --port N (default 8000), --ip ADDR (default
# 127.0.0.1: put a TLS proxy in front, or pass --ip 0.0.0.0 on a trusted network).
#
# What it does, each step only when needed (a second run changes nothing):
#   1. configurable-http-proxy from npm into build/node (scripts/install_system_deps.sh --proxy-only);
#   2. the Unix group n2l-instructors; a local account for each user (no password: set one with
#      `passwd NAME`), home folders closed to others (0700), instructors in n2l-instructors;
#   3. checks that a student's account can run the course's venv (it must be readable by others);
#   4. closes what students must not read to everyone but n2l-instructors: solutions/ (answers,
#      hidden tests, probes.py), tests/ (correct and wrong answers) and .git (their history);
#   5. nbgrader's exchange for the course and the hub's settings (python -m grader.classroom configure).
# Then start the hub: `make classroom` (or the systemd unit it prints).
set -euo pipefail

die() { echo "ERROR: setup.sh: $*" >&2; exit 1; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
STATE=/srv/n2l-classroom
EXCHANGE=""
OWNER="" INSTRUCTORS="" STUDENTS="" PORT=8000 IP=127.0.0.1
while [ $# -gt 0 ]; do
    case "$1" in
        --state) STATE="$2"; shift 2 ;;
        --exchange) EXCHANGE="$2"; shift 2 ;;
        --owner) OWNER="$2"; shift 2 ;;
        --instructors) INSTRUCTORS="$2"; shift 2 ;;
        --students) STUDENTS="$2"; shift 2 ;;
        --port) PORT="$2"; shift 2 ;;
        --ip) IP="$2"; shift 2 ;;
        *) die "unknown option $1 (see the comment at the top of this script)" ;;
    esac
done
EXCHANGE="${EXCHANGE:-$STATE/exchange}"
[ "$(id -u)" -eq 0 ] || die "run it as root (it makes accounts and the exchange's folders)."
[ -n "$OWNER" ] && [ -n "$INSTRUCTORS" ] && [ -n "$STUDENTS" ] \
    || die "--owner, --instructors and --students are required."
[[ ",$INSTRUCTORS," == *",$OWNER,"* ]] || die "--owner $OWNER must be one of --instructors."
[ -x "$VENV/bin/jupyterhub" ] || die "no $VENV/bin/jupyterhub: run 'make setup' first."

bash "$REPO/scripts/install_system_deps.sh" --proxy-only

getent group n2l-instructors >/dev/null || groupadd n2l-instructors
make_user() {  # $1: name, $2: extra group or ""
    if ! id "$1" >/dev/null 2>&1; then
        useradd --create-home --shell /bin/bash --user-group "$1"
        echo "made account $1 (set its password with: passwd $1)"
    fi
    chmod 0700 "$(getent passwd "$1" | cut -d: -f6)"
    [ -z "$2" ] || usermod -a -G "$2" "$1"
}
IFS=, read -r -a instructor_list <<<"$INSTRUCTORS"
IFS=, read -r -a student_list <<<"$STUDENTS"
for name in "${instructor_list[@]}"; do make_user "$name" n2l-instructors; done
for name in "${student_list[@]}"; do make_user "$name" ""; done

runuser -u "${student_list[0]}" -- "$VENV/bin/python" -c "import grader.classroom" 2>/dev/null \
    || die "user ${student_list[0]} cannot run $VENV/bin/python with the course: the checkout, its
venv and the Python the venv was made from ($(readlink -f "$VENV/bin/python")) must be readable by every
user (e.g. clone it under /opt with a system Python, not in /root or with a pyenv Python under /root)."

for path in solutions tests .git; do
    if [ -e "$REPO/$path" ]; then
        chgrp -R n2l-instructors "$REPO/$path"
        chmod -R g+rX,o-rwx "$REPO/$path"
    fi
done
runuser -u "${student_list[0]}" -- test -r "$REPO/solutions" \
    && die "students can still read $REPO/solutions (a folder above it grants them access?)"

"$VENV/bin/python" -m grader.classroom configure --state "$STATE" --exchange "$EXCHANGE" \
    --owner "$OWNER" --instructors "$INSTRUCTORS" --students "$STUDENTS" --port "$PORT" --ip "$IP" \
    --proxy "$REPO/build/node/node_modules/.bin/configurable-http-proxy"

cat <<EOT
Ready. Start the hub (as root) with:
    make -C $REPO classroom CLASSROOM_STATE=$STATE
or as a systemd service, /etc/systemd/system/n2l-classroom.service:
    [Unit]
    Description=JupyterHub for Neurons to LLMs
    After=network.target
    [Service]
    WorkingDirectory=$STATE
    ExecStart=$VENV/bin/jupyterhub -f $REPO/scripts/classroom/jupyterhub_config.py
    Restart=on-failure
    [Install]
    WantedBy=multi-user.target
Users log in at http://$IP:$PORT/ with their Unix passwords. The instructor ($OWNER) releases with:
    $VENV/bin/python -m grader.classroom release --chapter ch01 --workspace ~/grading --exchange $EXCHANGE
EOT
