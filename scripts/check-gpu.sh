#!/usr/bin/env bash
# The CUDA path checked and measured on a GPU machine, in two parts that each fit one device call:
#   scripts/check-gpu.sh          Muon's two Newton-Schulz forms in each precision, the CUDA tests and
#                                 vitkit-versus-timm throughput (5-6 min on an H200)
#   scripts/check-gpu.sh suite    the whole suite with CUDA visible (training then defaults to the GPU
#                                 in bf16); more than 4 min with 15 workers on an H200 (2026-11-29)
# Uses the machine's own python3 and packages (torch, timm, lightning, safetensors); vitkit from src.
# Logs land in $OUT (default gpu-check/).
# On an H100 (2026-11-26): CUDA tests 1.7 min, benchmarks 1.7 min, the suite 4 min with 14 workers.
# On an H200 (2026-11-29): the CUDA tests 1.9 min; the two parts together ran past one call's 10 min.
set -u
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, timm, lightning; print('torch', torch.__version__, 'timm', timm.__version__,
'lightning', lightning.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

if [ "${1:-}" = suite ]; then
  echo "== whole suite with CUDA visible"
  timeout 540 $PY -m pytest -q -p no:cacheprovider -n 15 --dist loadgroup --timeout 300 --durations=10 2>&1 \
    | tee "$OUT/suite.log" | tail -25
  exit
fi

echo "== Muon's Newton-Schulz forms (error against float64, singular values, median ms)"
$PY scripts/muon-forms.py 2>&1 | tee "$OUT/muon-forms.log"

echo "== CUDA tests"
$PY -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py "tests/test_data_augment.py::test_cuda_matches_cpu_with_a_cpu_generator" 2>&1 \
  | tee "$OUT/cuda-tests.log" | tail -15

echo "== benchmarks (bf16 autocast; medians of alternating rounds)"
for spec in "cifar-tiny 1024" "B/16 256" "B/16 256 --compile"; do
  set -- $spec
  timeout 150 $PY -m vitkit.cli.main bench --model "$1" --batch-size "$2" --against timm --rounds 5 --steps 10 ${3:-} --json \
      | tee -a "$OUT/bench.jsonl" | $PY -c "import json,sys; r=json.loads(sys.stdin.read());
print(r['model'], r['batch_size'], 'compile' if r['compile'] else 'eager', 'peak %.0f TFLOP/s' % (r['matmul_peak_gflops']/1e3),
      *('%s: %.0f vs %.0f img/s (%.2fx), %.0f%% of peak' % (m, r['vitkit'][m]['images_per_s'], r['timm'][m]['images_per_s'],
        r['ratio_vs_timm'][m], 100*r['vitkit'][m]['fraction_of_peak']) for m in ('train', 'infer')), sep=' | ')"
done
