#!/usr/bin/env bash
# Regenerate (or --check) data/sample/ from registry packages only.
# Installs the pinned Debian tools (apt-get) and a private pinned venv outside the
# repo, then runs generate.py with all arguments passed through.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${MOTLEY_DATAGEN_VENV:-$HOME/.cache/motley/datagen-venv}"

# Debian packages: espeak-ng (speech), flac (FLAC), bible-kjv (+ bible-kjv-text), dict-devil (text).
need=()
for pkg in espeak-ng flac bible-kjv bible-kjv-text dict-devil; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || need+=("$pkg")
done
if ((${#need[@]})); then
  echo "installing Debian packages: ${need[*]}" >&2
  sudo_=""; [[ $(id -u) -eq 0 ]] || sudo_="sudo"
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

# Private venv with exactly the pinned wheels; a stamp records the requirements it was built from.
stamp="$venv/.motley-requirements.sha256"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [[ ! -x "$venv/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  echo "building venv $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --no-input --no-deps --only-binary=:all: -r "$here/requirements.txt" >&2
  echo "$want" > "$stamp"
fi

exec "$venv/bin/python" "$here/generate.py" "$@"
