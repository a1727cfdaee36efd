#!/usr/bin/env bash
# Each extra alone, in a fresh venv in an empty folder, installed from the built wheel:
# import its public modules and run a unit of work (.ci/smoke.py).
# Usage: .ci/extras.sh dist/sqlalchemy_dbsession-*.whl [EXTRA...]   (default: all of them)
set -euo pipefail
wheel=$(realpath "$1")
smoke=$(realpath "$(dirname "$0")/smoke.py")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
extras=("${@:2}")
[ ${#extras[@]} -gt 0 ] || extras=(core postgres mysql async fastapi flask)
for extra in "${extras[@]}"; do
    target="$wheel"
    [ "$extra" = core ] || target="sqlalchemy-dbsession[$extra] @ file://$wheel"
    python3 -m venv "$work/$extra"
    "$work/$extra/bin/pip" install -q "$target"
    mkdir "$work/$extra-cwd"
    (cd "$work/$extra-cwd" && PATH="$work/$extra/bin:$PATH" "$work/$extra/bin/python" "$smoke" "$extra")
done
