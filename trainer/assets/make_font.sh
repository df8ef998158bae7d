#!/bin/sh
# Regenerates DejaVuSans-ascii.ttf: DejaVu Sans cut down to printable ASCII, bundled so the
# loss plot draws its labels on a machine with no system fonts (plotters "ab_glyph").
# Needs fonttools (pip install fonttools) and the Debian package fonts-dejavu-core.
set -eu
cd "$(dirname "$0")"
pyftsubset /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf \
  --unicodes="U+0020-007E" --layout-features='' --no-hinting --desubroutinize \
  --name-IDs='*' --output-file=DejaVuSans-ascii.ttf
cp /usr/share/doc/fonts-dejavu-core/copyright DejaVuSans-LICENSE.txt
