#!/bin/bash
# One device session for issue 11 (run from a clean copy of the repository root, PYTHONPATH=. install-free):
# sampler img/s (FP, W4A8 fake quant) + a 5,120-image sample + Inception run projected to 50k, block
# reconstruction it/s, and a 5%-budget CIFAR-10 W4A8 tcaq calibration projected to the full budget.
# Each stage has its own timeout; logs, report.json and the merged perf.json go to $OUT.
#   OUT=/tmp/gpu_out bash bench/gpu_issue11.sh
#   OUT=/tmp/gpu_out STAGES=calib CALIB_T=540 bash bench/gpu_issue11.sh   # only the calibration projection
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
SAMPLE_T=${SAMPLE_T:-240} RECON_T=${RECON_T:-100} CALIB_T=${CALIB_T:-240}
STAGES=${STAGES:-sample recon calib}
BATCH=${BATCH:-512} FID_IMAGES=${FID_IMAGES:-5120} SCALE=${SCALE:-0.05} PAR=${PAR:-0}
stage() { local name=$1 t=$2; shift 2; local t0=$(date +%s)
  case " $STAGES " in *" $name "*) ;; *) echo "== $name skipped (STAGES)"; return;; esac
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name rc=$rc $(( $(date +%s) - t0 )) s"; grep -v '^I[0-9]\{4\}\|^W[0-9]\{4\}' "$OUT/$name.log" | tail -n 14; }
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python -c 'import jax; print(jax.__version__, jax.devices())' >> "$OUT/gpu.txt" 2>&1; cat "$OUT/gpu.txt"
stage sample "$SAMPLE_T" python bench/sample.py --models cifar10 --cifar_batch_sizes "$BATCH" --steps 100 \
  --fid_images "$FID_IMAGES" --write
stage recon "$RECON_T" python bench/recon.py --iters 500 --batch 32 --n 256 --write
stage calib "$CALIB_T" python bench/calib_projection.py --out_dir /tmp/proj --write --extrapolate_par_rounds=$(( 2 - PAR )) -- \
  --flagfile=configs/cifar10_w4a8.flags --model_dir= --model_config=ddim_cifar10 --iters_scale="$SCALE" \
  --forward_batch=512 --capture_batch=512 --noprogress --png_samples=0 --par_rounds="$PAR" --eval_units=true
if [[ " $STAGES " == *" calib "* && ! -f /tmp/proj/report.json ]]; then
  python bench/calib_projection.py --partial /tmp/proj > "$OUT/calib_partial.log" 2>&1; tail -n 8 "$OUT/calib_partial.log"
fi
cp docs/results/perf.json "$OUT/perf.json"; cp /tmp/proj/report.json "$OUT/calib_report.json" 2>/dev/null
true
