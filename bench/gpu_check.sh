#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one command: gsplat's CUDA build, the GPU-marked tests and
# CUDA training speed (gsplat against our PyTorch rasterizer on the same GPU).
#   usage: bench/gpu_check.sh STORE      (a store with subject 388 and a "full" bank)
# Logs go to $OUT (default ./gpu-check). gsplat and the project must be importable.
# The store of the measurements in docs/benchmarks-cuda.md (~40 MB, 512x512, images for 388):
#   rafdata synth chk --cameras 222200037,222200038,222200039,220700191,221501007 \
#       --frames 4 --width 512 --height 512
#   rafdata ingest chk -o chk.h5 --images-for 388 && rafdata build-bank chk.h5
set -uo pipefail
STORE=${1:?usage: bench/gpu_check.sh STORE}
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
# gsplat compiles for every architecture in the list on first use: the GPU's own is enough.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, gsplat; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'gsplat', gsplat.__version__)"

echo "== gsplat build (arch $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs)"
t0=$(date +%s)
timeout "${BUILD_TIMEOUT:-420}" python3 -c "from gsplat.cuda._backend import _C; assert _C is not None, 'no gsplat CUDA module'" \
  >"$OUT/gsplat_build.log" 2>&1
echo "gsplat build: exit $? after $(( $(date +%s) - t0 )) s"
tail -n 15 "$OUT/gsplat_build.log"

echo "== GPU-marked tests"
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_render.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 25

echo "== training speed"
timeout "${TRAIN_TIMEOUT:-200}" python3 bench/bench_train.py --cuda "$STORE" 2>&1 | tee "$OUT/train_cuda.md" | tail -n 30

echo "== rafmodel train + eval on CUDA (CLI)"
RUN=${RUN_DIR:-/tmp/gpu-check-run}
rm -rf "$RUN"
timeout 150 python3 -c 'import sys; from cli.rafmodel import main; sys.exit(main())' \
  train "$STORE" --subject 388 --iters 60 --out "$RUN" --quiet 2>&1 | tail -n 5
echo "train: exit ${PIPESTATUS[0]}"
timeout 150 python3 -c 'import sys; from cli.rafmodel import main; sys.exit(main())' \
  eval "$RUN" "$STORE" --frames 2 --no-videos --quiet 2>&1 | tail -n 15
echo "eval: exit ${PIPESTATUS[0]}"
cp "$RUN/config.json" "$OUT/run_config.json" 2>/dev/null
find "$RUN/eval" -maxdepth 1 -name "*.json" -exec cp {} "$OUT/" \; 2>/dev/null
