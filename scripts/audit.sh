#!/usr/bin/env bash
# `cargo audit` of Cargo.lock against a RustSec advisory snapshot kept in the repo, so the check
# runs offline and gives the same answer on every machine. `scripts/audit.sh --update` (needs
# github.com) replaces the snapshot with the current database.
set -euo pipefail
cd "$(dirname "$0")/.."
SNAPSHOT=scripts/audit/advisory-db.tar.gz
DB=.tmp/advisory-db
AUDIT_VERSION=0.22.2

if [ "${1:-}" = "--update" ]; then
    rm -rf .tmp/advisory-db-upstream
    git clone --depth 1 https://github.com/rustsec/advisory-db .tmp/advisory-db-upstream
    git -C .tmp/advisory-db-upstream archive --format=tar --prefix=advisory-db/ HEAD crates rust LICENSES README.md \
        | gzip -9n > "$SNAPSHOT"
    git -C .tmp/advisory-db-upstream log -1 --format='%H %cs' > scripts/audit/SNAPSHOT
    exit 0
fi

if ! command -v cargo-audit >/dev/null; then
    [ -x .tmp/tools/bin/cargo-audit ] || cargo install --locked --quiet --root .tmp/tools cargo-audit --version "$AUDIT_VERSION"
    export PATH="$PWD/.tmp/tools/bin:$PATH"
fi

# cargo-audit reads its database from a git repository: unpack the snapshot into one.
if [ ! -f "$DB/.stamp" ] || [ "$SNAPSHOT" -nt "$DB/.stamp" ]; then
    rm -rf "$DB" && mkdir -p .tmp
    tar -xzf "$SNAPSHOT" -C .tmp
    git -C "$DB" init -q
    git -C "$DB" add -A
    git -C "$DB" -c user.name=tessera -c user.email=tessera@localhost commit -q -m "RustSec snapshot $(cat scripts/audit/SNAPSHOT)"
    touch "$DB/.stamp"
fi
echo "RustSec advisory snapshot: $(cat scripts/audit/SNAPSHOT)"
if cargo audit --db "$DB" --no-fetch --stale --quiet -f scripts/audit/known-bad.lock >/dev/null 2>&1; then
    echo "error: cargo audit passed a lockfile with a known vulnerability: the advisory snapshot is broken" >&2
    exit 1
fi
# --stale: the snapshot is as old as its last --update, on purpose. Warnings (unmaintained or
# unsound crates, yanked versions) fail too, unless .cargo/audit.toml accepts them with a reason.
cargo audit --db "$DB" --no-fetch --stale --deny warnings
