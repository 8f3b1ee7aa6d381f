#!/usr/bin/env bash
# Writes docs/cli.md from `tessera-launcher --help`, so the reference cannot drift from the code.
# Usage: scripts/cli_docs.sh [LAUNCHER] > docs/cli.md
set -euo pipefail
launcher=${1:-target/release/tessera-launcher}
cat <<'HEAD'
# tessera-launcher

Generated from `tessera-launcher --help` by `scripts/cli_docs.sh` (`make docs`); a test fails
when it is out of date. Every flag also reads the environment variable named in brackets. Flags
of TGI features that Tessera does not have yet are parsed, and setting one is an error that
names it.

```text
HEAD
# A clean environment: clap shows the current value of each env var, which must not leak in.
env -i "$launcher" --help
echo '```'
