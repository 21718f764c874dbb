#!/usr/bin/env bash
# Installs the real servers that tests/test_deploy.py starts on loopback:
# nginx, prometheus and docker-compose (for `docker-compose config`), from Debian's packages.
# Also the browser that tests/test_page.py drives: Debian's chromium and chromium-driver.
# And Label Studio, in a virtual environment of its own, for tests/test_label_studio.py.
# Idempotent: installs only what is missing; a no-op when all three are present.
set -euo pipefail

bash "$(dirname "$0")/install_label_studio.sh"

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v prometheus >/dev/null 2>&1 || [ -x /usr/bin/prometheus ] || need+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)

# The web page's browser test: selenium starts these two by their paths (tests/test_page.py).
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)

# tests/test_container.py builds and runs the image: a Docker engine (dockerd and the client it ships
# with, which builds with BuildKit) and debootstrap, for the stand-in of the python base image.
{ [ -x /usr/sbin/dockerd ] && [ -x /usr/bin/docker ]; } || need+=(docker.io)
[ -x /usr/sbin/debootstrap ] || need+=(debootstrap)

if [ ${#need[@]} -eq 0 ]; then
    echo "install_deploy_deps: everything already present"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_deploy_deps: apt-get not found; install ${need[*]} by hand" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install_deploy_deps: need root (or sudo) to install ${need[*]}" >&2
        exit 1
    fi
fi

echo "install_deploy_deps: installing ${need[*]}"
# The packages' maintainer scripts must not start system services (no init system in CI,
# and the tests start their own instances on loopback): a policy-rc.d that refuses starts.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod +x "$policy"
    created_policy=1
fi
cleanup() {
    if [ "$created_policy" -eq 1 ]; then
        $SUDO rm -f "$policy"
    fi
}
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
# Refresh the package lists only when they are missing or older than a day.
if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
    $SUDO apt-get update -q
fi
$SUDO apt-get install -y -q --no-install-recommends "${need[@]}"

command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]
command -v prometheus >/dev/null 2>&1
command -v docker-compose >/dev/null 2>&1
[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]
echo "install_deploy_deps: done"
