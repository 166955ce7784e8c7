#!/usr/bin/env bash
# Regenerates kjv.txt, the embedded default corpus (`text("embedded:kjv", ...)`), from
# Debian's `bible-kjv` and `bible-kjv-text` packages (King James Version, public domain).
# Books: Genesis, Exodus, Matthew, Mark, Luke, John; chapter headings kept, verse numbers
# dropped, one verse per line (about 800 KB of ASCII).
set -euo pipefail
command -v bible >/dev/null || { apt-get update && apt-get install -y bible-kjv; }
for spec in "gen1:1-50:26" "ex1:1-40:38" "mat1:1-28:20" "mark1:1-16:20" "luke1:1-24:53" "john1:1-21:25"; do
    bible -l0 "$spec"
done | sed -E 's/^ +[0-9]+ //' > "$(dirname "$0")/kjv.txt"
