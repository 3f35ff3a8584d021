#!/usr/bin/env bash
# Creates (once) the Python virtual environment the tests use, and prints its interpreter's path.
# The environment lives in the cache directory, keyed by the requirements file's hash.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=hack/lib.sh
. "$here/lib.sh"

req="$here/python-requirements.txt"
key="$(sha256sum "$req" | cut -c1-12)"
venv="$CACHE_ROOT/venv-$key"
if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req" >&2
  touch "$venv/.complete"
  # Environments of older requirements are of no further use.
  for old in "$CACHE_ROOT"/venv-*; do
    [ "$old" = "$venv" ] || rm -rf "$old"
  done
fi
echo "$venv/bin/python"
