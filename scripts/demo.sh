#!/usr/bin/env bash
# The README's first command ends here. Until the hot-update work lands this shows what exists.
set -euo pipefail
bin=${1:-bin/hot}
"$bin" version
"$bin" doctor || true
