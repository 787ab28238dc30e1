#!/usr/bin/env bash
# Rebuilds docs/RESULTS.md from docs/results/*.md (one file per topic; each holds its commands and numbers).
#   bash docs/results/collect.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
{
echo "# Results"
echo
echo "Every number below was measured by the command printed beside it, on the project's shared 2-core CPU machine"
echo "(JAX 0.10.2 CPU), often while other jobs ran at once, so wall times are rough and only comparable within one"
echo "table, except where a section names the lent H200 GPU (issue 11, 2026-11-30). Sections are kept"
echo "per topic in docs/results/*.md and collected here by \`bash docs/results/collect.sh\`."
echo
echo "Contents: quantizer ops (issue 2) - model forward and parity (issue 3) - sampling and demo (issue 4) -"
echo "calibration and the demo FID table (issue 5) - FID/Inception (issue 6) - calibration redesign (issue 10) -"
echo "performance around the reconstruction loop (issue 11) - reliability probes (issue 13) - fidelity of the baselines"
echo "and TCAQ-DM's components (issue 14) - export and integer execution (issue 12)."
for f in quant forward ldm sample calibrate fid architecture perf reliability reliability_models reliability_eval reliability_checkpoint fidelity export; do
  echo
  echo "---"
  echo
  sed -e 's/^## /### /' -e 's/^# /## /' "docs/results/$f.md"
done
} > docs/RESULTS.md
