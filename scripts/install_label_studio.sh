#!/usr/bin/env bash
# Installs Label Studio for tests/test_label_studio.py, which starts it on loopback as the annotation tool our
# ML backend serves. It gets a virtual environment of its own (its Django and pinned dependencies would clash
# with the project's): $LABEL_STUDIO_VENV, by default .venv-label-studio at the repository's root (ignored by
# git; the test looks in the same two places). Idempotent: a no-op when its label-studio is there.
set -euo pipefail

VERSION="1.23.2"  # the release whose ML backend protocol service/label_studio follows
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${LABEL_STUDIO_VENV:-$root/.venv-label-studio}"

if [ -x "$venv/bin/label-studio" ]; then
    echo "install_label_studio: already in $venv"
    exit 0
fi
echo "install_label_studio: label-studio==$VERSION into $venv"
"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/pip" install -q "label-studio==$VERSION"
[ -x "$venv/bin/label-studio" ]
echo "install_label_studio: done"
