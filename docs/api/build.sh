#!/usr/bin/env bash
# The API reference: HTML pages built by pdoc from the docstrings of tvbasis's public modules.
#   bash docs/api/build.sh [OUT_DIR]        (default docs/api/html, not committed; CI builds it into a temp dir)
# Needs the docs extra (pip install -e ".[docs]" -c constraints.txt; dev includes it). Each package lists its public
# names in __all__, which is what pdoc documents; the CLI (cli), evaluation (eval) and the benchmark harness (bench)
# are left out.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-docs/api/html}"
modules=(tvbasis tvbasis.vectors tvbasis.errors tvbasis.taskset tvbasis.io tvbasis.store tvbasis.merge tvbasis.bases
         tvbasis.codecs tvbasis.compress tvbasis.passes tvbasis.engine tvbasis.interop tvbasis.stitch tvbasis.lora
         tvbasis.methods)
python -m pdoc --docformat restructuredtext --no-show-source -o "$out" "${modules[@]}"
# every module got its page
for m in "${modules[@]}"; do
    test -s "$out/${m//.//}.html" || { echo "docs/api/build.sh: no page for $m in $out" >&2; exit 1; }
done
echo "API reference: $out/index.html (${#modules[@]} modules)"
