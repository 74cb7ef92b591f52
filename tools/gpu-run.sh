#!/usr/bin/env bash
# gpu-run.sh: the one prepared run on a lent GPU machine (issue 18). Build and stage first, here:
#
#   ../shared/tools/gpu-pack            # .gpu/bin/{test,bench,example,bin}-NAME and the Vulkan loader
#
# then on the GPU machine (the device tool, carrying .gpu), from the repository root:
#
#   bash tools/gpu-run.sh               # everything goes under $OUT (default: ./gpu-out)
#
# Each step has its own time limit and its log under $OUT; a failing step is recorded and the run
# goes on to the next one, so one run yields every number it can. The summary is $OUT/summary.txt.
# Without a GPU (here, with lavapipe) it runs up to the first CUDA step: the wgpu suites pass on
# the CPU's Vulkan and the CUDA steps record "unavailable".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
summary="$OUT/summary.txt"
: >"$summary"
if [ -f .gpu/env.sh ]; then
  # shellcheck disable=SC1091
  source .gpu/env.sh >"$OUT/env.txt" 2>&1
fi
bin=.gpu/bin
if [ ! -d "$bin" ]; then
  echo "gpu-run: no $bin: run ../shared/tools/gpu-pack first and carry .gpu" | tee -a "$summary"
  exit 1
fi

# step NAME LIMIT_SECONDS COMMAND...: runs COMMAND with a time limit, its output in $OUT/NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - start)) s" | tee -a "$summary"
  return 0
}

date -u +"date %Y-%m-%dT%H:%M:%SZ" >>"$summary"
step nvidia-smi 30 nvidia-smi -q

# 1. The suites with the GPU backends required: CUDA executes every kernel (no emulator), wgpu runs
#    on the NVIDIA Vulkan driver.
export DISTILLATION_REQUIRE=wgpu,cuda
# The integration tests are one binary (tests/suite); each file is a module, run here as its own
# step (a libtest filter "<module>::") with its own time limit.
for t in kernels half dkd big contract tape record cpu_fast errors fixtures properties sparse \
  fused_linear sharded nvrtc; do
  [ -x "$bin/test-suite" ] && step "test-$t" 240 "$bin/test-suite" "$t::"
done

# 2. The Python tests on CUDA tensors, where PyTorch is on the machine.
lib=$(ls target/release/libdistillation.so .gpu/bin/libdistillation.so 2>/dev/null | head -n 1)
if [ -n "$lib" ] && python3 -c "import torch; assert torch.cuda.is_available()" >/dev/null 2>&1; then
  DISTILLATION_LIB="$PWD/$lib" PYTHONPATH="$PWD/python" \
    step python-cuda 240 python3 -m pytest -q -p no:cacheprovider python/tests -k cuda
else
  echo "python-cuda: skipped (no PyTorch with CUDA, or no libdistillation.so: carry target/release/libdistillation.so)" | tee -a "$summary"
fi

# 3. The GPU bench tables (CUDA and wgpu, the device-to-device copy measured in the same run).
[ -x "$bin/example-gpu_bench" ] &&
  step gpu-bench 300 "$bin/example-gpu_bench" --large --json "$OUT/gpu_bench.json"

# 4. The peers in the same run: PyTorch eager and torch.compile, Liger where its wheel came along.
if python3 -c "import torch; assert torch.cuda.is_available()" >/dev/null 2>&1; then
  step torch-peers 300 python3 benches/peers/torch_losses.py --large
else
  echo "torch-peers: skipped (no PyTorch with CUDA on this machine)" | tee -a "$summary"
fi

echo "gpu-run: done; logs and tables under $OUT" | tee -a "$summary"
