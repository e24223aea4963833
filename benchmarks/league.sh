#!/bin/bash
# The published league: every objective at an equal budget on this machine, then the league report, copied
# into benchmarks/results/ as league-<spec>-<machine>-<date>.{json,html,md} with the plan (compare.json).
#   bash benchmarks/league.sh [SPEC] [OUT] [mimscale compare options...]
#   bash benchmarks/league.sh tiny_cpu runs/league                  # 7 objectives x 10 min (~90 min on 2 cores)
#   bash benchmarks/league.sh tiny_cpu_mnist runs/league_mnist      # the second data set (a FLOP budget)
# Keep the machine otherwise idle for a minutes budget: wall-clock training time is what is compared.
# Rerunning the same command resumes (complete members are kept).
set -euo pipefail
spec=${1:-tiny_cpu}
out=${2:-runs/league_$spec}
shift $(( $# < 2 ? $# : 2 ))
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python}
"$python" -m mimscale.cli compare "$spec" --out "$out" "$@"
"$python" -m mimscale.cli report "$out"
name="league-$spec-$(hostname)-$(date -u +%Y-%m-%d)"
for f in report.json report.html league.md compare.json; do
    ext=${f##*.}; base=${f%.*}
    dest="$here/benchmarks/results/$name$([ "$base" = report ] || echo "-$base").$ext"
    cp "$out/$f" "$dest"
    echo "wrote $dest"
done
