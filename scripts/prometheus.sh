#!/usr/bin/env bash
# Debian's `prometheus` package (prometheus + promtool), unpacked into a project folder for
# the observability tests: no root, no service started, nothing installed system-wide.
# Usage: scripts/prometheus.sh DEST   (then DEST/usr/bin/prometheus)
set -euo pipefail
dest=${1:?destination folder}
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || {
    echo "error: the observability tests need Debian's prometheus package (apt-get and dpkg-deb not found)" >&2
    exit 1
}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
# The package lists may be missing on a fresh image; refresh them once if the download fails.
if ! apt-get download prometheus >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || true
    apt-get download prometheus
fi
cd - >/dev/null
rm -rf "$dest"
mkdir -p "$dest"
dpkg-deb -x "$work"/prometheus_*.deb "$dest"
"$dest/usr/bin/prometheus" --version | head -1
