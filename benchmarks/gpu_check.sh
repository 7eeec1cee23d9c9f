#!/usr/bin/env bash
# The GPU checks, in one go, on a machine with a CUDA GPU: the CUDA tests, bench_overhead.py on CUDA for
# cnn_tanh, resnet20_gn, embbag and bilstm, and one 40-epoch MNIST dpsgd run. Output goes under
# results/perf/gpu_<date>/ (or $GPU_OUT). CI never runs this: it needs a GPU.
#
#   bash benchmarks/gpu_check.sh            # with .venv/bin/python if present, else python3
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${GPU_OUT:-results/perf/gpu_$(date +%Y%m%d)}
export PYTHONPATH=${PYTHONPATH:-.} OMP_WAIT_POLICY=PASSIVE
if [ -z "${DPBENCH_DATA:-}" ]; then
  for d in ../shared/data shared/data; do [ -d "$d/mnist" ] && export DPBENCH_DATA=$(cd "$d" && pwd) && break; done
fi
mkdir -p "$OUT"
status=0
{ nvidia-smi; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"; } \
  > "$OUT/device.txt" 2>&1 || { echo "no CUDA GPU here: $(tail -1 "$OUT/device.txt")"; exit 2; }

echo "== CUDA tests" | tee "$OUT/cuda_tests.txt"
"$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs 2>&1 | tee -a "$OUT/cuda_tests.txt" || status=1

echo "== bench_overhead on CUDA" | tee "$OUT/bench.txt"
for spec in "mnist cnn_tanh" "cifar10 resnet20_gn" "imdb embbag" "imdb bilstm"; do
  set -- $spec
  cmd=("$PY" benchmarks/bench_overhead.py --dataset "$1" --model "$2" --mech dpsgd --steps 20 --device cuda)
  echo "\$ ${cmd[*]:1}" | tee -a "$OUT/bench.txt"
  "${cmd[@]}" 2>&1 | tee -a "$OUT/bench.txt" || status=1
done

echo "== 40-epoch MNIST dpsgd on CUDA (goal: under 60 s of training on one H200)" | tee "$OUT/run.txt"
cmd=("$PY" -m dpbench.cli run --mech dpsgd --eps 3 --dataset mnist --epochs 40 --device cuda --quiet --out "$OUT/runs.csv")
echo "\$ dpbench ${cmd[*]:3}" | tee -a "$OUT/run.txt"
start=$(date +%s)
"${cmd[@]}" 2>&1 | tee -a "$OUT/run.txt" || status=1
echo "wall (process, including data loading): $(( $(date +%s) - start )) s" | tee -a "$OUT/run.txt"
exit $status
