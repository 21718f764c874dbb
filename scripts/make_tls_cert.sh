#!/bin/sh
# A self-signed certificate for the compose stack's nginx (docker/nginx.conf terminates TLS with it):
#   scripts/make_tls_cert.sh [DIR] [HOSTNAME]      # default: docker/tls localhost
# writes DIR/tls.crt and DIR/tls.key. For anything beyond a test, put a certificate from your CA there
# instead (same two names), or point MRCNN_TLS_DIR at the folder that holds them.
set -eu
dir=${1:-docker/tls}
host=${2:-localhost}
mkdir -p "$dir"
openssl req -x509 -newkey rsa:2048 -sha256 -days 365 -nodes \
    -keyout "$dir/tls.key" -out "$dir/tls.crt" \
    -subj "/CN=$host" -addext "subjectAltName=DNS:$host,IP:127.0.0.1"
chmod 644 "$dir/tls.key"  # nginx's unprivileged user (uid 101) reads it through the read-only mount
echo "wrote $dir/tls.crt and $dir/tls.key for $host"
