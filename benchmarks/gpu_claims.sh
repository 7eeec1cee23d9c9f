#!/usr/bin/env bash
# A claim check of benchmarks/claims/ on one CUDA GPU inside a fixed time budget: the CUDA tests, five
# timed steps of each mechanism (speed, and the feature cache filled once), then the check's seed 0 of
# every mechanism side by side, then its other seeds, each sweep stopped at the budget (finished rows stay;
# a rerun resumes). Rows go to the spec's CSV unless CLAIM_OUT names another folder.
#
#   BUDGET=520 bash benchmarks/gpu_claims.sh [claim name]   # default modelmix-cifar10-scatter_cnn
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s); BUDGET=${BUDGET:-3600}; DEV=${DEV:-cuda}; PHYSICAL=${PHYSICAL:-8192}
NAME=${1:-modelmix-cifar10-scatter_cnn}; SPEC=benchmarks/claims/$NAME.toml
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
[ -f "$SPEC" ] || { echo "no claim check named $NAME (benchmarks/claims/*.toml)"; exit 2; }
left() { echo $(( T0 + BUDGET - $(date +%s) )); }
out=${CLAIM_OUT:+$CLAIM_OUT/runs.csv}
out=${out:-$("$PY" -c "import tomllib,sys; print(tomllib.load(open(sys.argv[1],'rb'))['fixed']['out'])" "$SPEC")}
mkdir -p "$(dirname "$out")"
# the spec with the GPU's physical batch size (an execution setting: rows and hashes are the CPU's)
spec=$(mktemp --suffix .toml); sed "s/^\[fixed\]$/[fixed]\nphysical_batch_size = $PHYSICAL/" "$SPEC" > "$spec"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

echo "== CUDA tests ($(left) s left)"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs 2>&1 | tail -3

echo "== five timed steps per mechanism ($(left) s left)"
"$PY" -m dpbench.cli sweep "$spec" --seeds 0 --dry-run 2>/dev/null | while read -r _ _ args; do
  cmd=$(echo "$args" | sed 's/--steps [0-9]*/--steps 5/')
  timeout 200 "$PY" -m dpbench.cli run $cmd --physical-batch-size "$PHYSICAL" --device "$DEV" --quiet \
    --out "$(dirname "$out")/speed.csv" > /dev/null 2>&1 || echo "failed: dpbench run $cmd"
done
"$PY" -c "import pandas as pd,sys; print(pd.read_csv(sys.argv[1])[['mech','batch_size','steps','samples_per_s','peak_mem_mb']].to_string())" \
  "$(dirname "$out")/speed.csv"

mechs=$("$PY" -c "import tomllib,sys; print(len(tomllib.load(open(sys.argv[1],'rb'))['grid']['mech']))" "$SPEC")
workers() { printf "$DEV%.0s," $(seq "$1") | sed 's/,$//'; }
echo "== seed 0 ($(left) s left)"
timeout "$(left)" "$PY" -m dpbench.cli sweep "$spec" --seeds 0 --devices "$(workers "$mechs")" --out "$out" 2>&1 | grep -E "done|failed"
echo "== other seeds ($(left) s left)"
[ "$(left)" -gt 60 ] && timeout "$(left)" "$PY" -m dpbench.cli sweep "$spec" --devices "$(workers $((2 * mechs)))" --out "$out" 2>&1 | grep -E "done|failed"
"$PY" -c "import pandas as pd,sys; print(pd.read_csv(sys.argv[1])[['mech','seed','steps','eps_spent','test_acc','wall_s','samples_per_s']].to_string())" "$out"
rm -f "$spec"
echo "total $(( $(date +%s) - T0 )) s"
