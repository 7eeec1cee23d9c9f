# dpbench: set-up, tests and the main job. Every target installs what it needs first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# OpenMP threads that spin while waiting make torch 5-10x slower when another process is busy.
export OMP_WAIT_POLICY ?= PASSIVE
# The offline dataset copies beside this checkout, when present (users with internet need none).
ifneq ($(wildcard ../shared/data/mnist),)
export DPBENCH_DATA ?= $(abspath ../shared/data)
endif

.PHONY: install test test-all run bench tune-mnist compare-tuned-mnist sweep-mnist sweep-fmnist sweep-cifar10 sweep-imdb plots report audit clean

install: $(STAMP)

# torch and torchvision are pinned in the same pip command (pyproject.toml pins them too).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1 -e '.[dev,ray]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

# Also the slow tests that train on the real offline datasets.
test-all: install
	$(PY) -m pytest -q -m ''

run: install
	$(VENV)/bin/dpbench run --mech dpis --eps 3 --dataset mnist

# Equal-budget tuning of every mechanism on the validation split at eps 2, one study per benchmark pair
# (benchmarks/PROTOCOL.md); resumable, and a finished tune trains nothing. `make tune-mnist` is the MNIST
# ScatterNet study (measured: 341-465 s of trial time per mechanism for dpsgd, nonprivate and the scaling
# family, 12 trials; DPIS, ModelMix and GED take longer per trial).
TUNE_MECHS ?= dpsgd,nonprivate,auto_s,psac,psasc,rs,dpis,modelmix,ged
TUNE_SPACE_mnist-scatter_linear   = --dataset mnist --model scatter_linear --batch-sizes 512,1024,2048,4096 --epoch-choices 10,20,40
TUNE_SPACE_fmnist-scatter_linear  = --dataset fmnist --model scatter_linear --batch-sizes 512,1024,2048,4096 --epoch-choices 10,20,40
TUNE_SPACE_cifar10-scatter_linear = --dataset cifar10 --model scatter_linear --batch-sizes 512,1024,2048,4096 --epoch-choices 10,20,40
TUNE_SPACE_imdb-embbag            = --dataset imdb --model embbag --batch-sizes 256,512,1024 --epoch-choices 6,12,24 --lr-range sgd=1:1000
TUNE_SPACE_mnist-cnn_tanh         = --dataset mnist --model cnn_tanh --batch-sizes 256,512,1024,2048 --epoch-choices 10,20,40
TUNE_SPACE_fmnist-cnn_tanh        = --dataset fmnist --model cnn_tanh --batch-sizes 256,512,1024,2048 --epoch-choices 10,20,40
BENCH_PAIRS := mnist-scatter_linear fmnist-scatter_linear cifar10-scatter_linear imdb-embbag mnist-cnn_tanh fmnist-cnn_tanh
TUNE_TARGETS := $(addprefix tune-,$(BENCH_PAIRS))
BENCHMARK_TARGETS := $(addprefix benchmark-,$(BENCH_PAIRS))
.PHONY: $(TUNE_TARGETS) $(BENCHMARK_TARGETS) benchmark-report

$(TUNE_TARGETS): tune-%: install
	$(VENV)/bin/dpbench tune --mech $(TUNE_MECHS) $(TUNE_SPACE_$*) --eps 2 --trials 12 --jobs 2 \
		--out results/tuning/$*-eps2.toml

tune-mnist: tune-mnist-scatter_linear

# The benchmark table's final runs of one pair (3 seeds, test split, its tuned recipes; resumable).
$(BENCHMARK_TARGETS): benchmark-%: install
	$(VENV)/bin/dpbench sweep benchmarks/benchmark/$*.toml --jobs 2

# Targeted checks of a paper's claim in its own settings (benchmarks/claims/<name>.toml; resumable).
CLAIM_CHECKS := modelmix-fmnist-scatter_cnn modelmix-cifar10-scatter_cnn
CLAIM_TARGETS := $(addprefix claim-,$(CLAIM_CHECKS))
.PHONY: $(CLAIM_TARGETS)

$(CLAIM_TARGETS): claim-%: install
	$(VENV)/bin/dpbench sweep benchmarks/claims/$*.toml --jobs 2
	$(VENV)/bin/dpbench report results/claims/$*/runs.csv -o results/claims/$*/report.md \
		--title "dpbench claim check: $*, the paper's own settings"

# Sensitivity checks of the table (benchmarks/sensitivity/): one mechanism tuned again at another eps, then
# its final runs; outside the equal-budget table (resumable).
sensitivity-fmnist-cnn_tanh-dpsgd-eps1: install
	$(VENV)/bin/dpbench tune --mech dpsgd $(TUNE_SPACE_fmnist-cnn_tanh) --eps 1 --trials 12 --jobs 2 \
		--out results/tuning/fmnist-cnn_tanh-eps1-dpsgd.toml
	$(VENV)/bin/dpbench sweep benchmarks/sensitivity/fmnist-cnn_tanh-dpsgd-eps1.toml --jobs 2
	$(VENV)/bin/dpbench report results/sensitivity/fmnist-cnn_tanh-dpsgd-eps1/runs.csv \
		-o results/sensitivity/fmnist-cnn_tanh-dpsgd-eps1/report.md \
		--title "dpbench sensitivity check: DP-SGD tuned at eps 1, Fashion-MNIST cnn_tanh"
	$(PY) benchmarks/paired_to_baseline.py results/benchmark/fmnist-cnn_tanh/runs.csv --eps 1 \
		--baseline results/sensitivity/fmnist-cnn_tanh-dpsgd-eps1/runs.csv \
		> results/sensitivity/fmnist-cnn_tanh-dpsgd-eps1/paired.md
.PHONY: sensitivity-fmnist-cnn_tanh-dpsgd-eps1

# DP-SGD with the recipe other mechanisms were tuned to on CIFAR-10 scatter_linear (RS and DPIS drew one, Auto-S
# and PSAC another): how much of their lead over DP-SGD's own recipe is the recipe's; paired with every row of the pair.
SENS_C10_WHOSE_rs := RS's and DPIS's
SENS_C10_WHOSE_auto_s := Auto-S's and PSAC's
SENS_C10_TARGETS := sensitivity-cifar10-scatter_linear-dpsgd-rs-recipe sensitivity-cifar10-scatter_linear-dpsgd-auto_s-recipe
SENS_C10_CHECK = cifar10-scatter_linear-dpsgd-$*-recipe
$(SENS_C10_TARGETS): sensitivity-cifar10-scatter_linear-dpsgd-%-recipe: install
	$(VENV)/bin/dpbench sweep benchmarks/sensitivity/$(SENS_C10_CHECK).toml --jobs 2
	$(VENV)/bin/dpbench report results/sensitivity/$(SENS_C10_CHECK)/runs.csv \
		-o results/sensitivity/$(SENS_C10_CHECK)/report.md \
		--title "dpbench sensitivity check: DP-SGD with $(SENS_C10_WHOSE_$*) recipe, CIFAR-10 scatter_linear"
	@for e in 1 2 4 8; do $(PY) benchmarks/paired_to_baseline.py results/benchmark/cifar10-scatter_linear/runs.csv \
		--eps $$e --baseline results/sensitivity/$(SENS_C10_CHECK)/runs.csv && echo; done \
		> results/sensitivity/$(SENS_C10_CHECK)/paired.md
.PHONY: $(SENS_C10_TARGETS)

# ModelMix's ScatterNet claim check again at lr 4 (no momentum): the long-run step of the paper's lr 0.4 with
# momentum 0.9; its rows pair with the claim check's DP-SGD rows in one report.
sensitivity-modelmix-fmnist-scatter_cnn-lr4: claim-modelmix-fmnist-scatter_cnn
	$(VENV)/bin/dpbench sweep benchmarks/sensitivity/modelmix-fmnist-scatter_cnn-lr4.toml --jobs 2
	$(VENV)/bin/dpbench report results/claims/modelmix-fmnist-scatter_cnn/runs.csv \
		results/sensitivity/modelmix-fmnist-scatter_cnn-lr4/runs.csv \
		-o results/sensitivity/modelmix-fmnist-scatter_cnn-lr4/report.md \
		--title "dpbench sensitivity check: ModelMix's ScatterNet claim on Fashion-MNIST at lr 4, no momentum"
.PHONY: sensitivity-modelmix-fmnist-scatter_cnn-lr4

# Plot and report of every pair with rows, then the headline table of all of them (md, LaTeX, CSV).
benchmark-report: install
	@for f in results/benchmark/*/runs.csv; do d=$${f%/runs.csv}; \
	  $(VENV)/bin/dpbench plot $$f --published --log-eps -o $$d/accuracy_vs_eps.png && \
	  $(VENV)/bin/dpbench report $$f -o $$d/report.md --title "dpbench benchmark: $$(basename $$d)" || exit 1; done
	$(VENV)/bin/dpbench report results/benchmark/*/runs.csv -o results/benchmark/report.md --title "dpbench benchmark"
	$(VENV)/bin/dpbench report results/benchmark/*/runs.csv --format latex -o results/benchmark/table.tex --title "dpbench benchmark"
	$(VENV)/bin/dpbench report results/benchmark/*/runs.csv --format csv -o results/benchmark/table.csv
	$(PY) benchmarks/readme_headline.py results/benchmark/*/runs.csv

# The tuned recipes against the built-in ones on the MNIST test split (eps 2, 3 seeds; resumable).
compare-tuned-mnist: install
	$(VENV)/bin/dpbench sweep benchmarks/mnist-tuned.toml --jobs 2
	@# modelmix and ged have no built-in scatter_linear recipe that runs at eps 2 (momentum 0.9; batch 4096): those fail
	-$(VENV)/bin/dpbench sweep benchmarks/mnist-untuned.toml --jobs 2
	$(VENV)/bin/python benchmarks/compare_tuned.py results/tuning/mnist-test/runs.csv

# Sweeps are resumable: re-running one trains only what is missing from its CSV.
SWEEP_FLAGS ?=
sweep-mnist: install
	$(VENV)/bin/dpbench sweep benchmarks/mnist.toml $(SWEEP_FLAGS)

sweep-fmnist: install
	$(VENV)/bin/dpbench sweep benchmarks/fmnist.toml $(SWEEP_FLAGS)

sweep-cifar10: install
	$(VENV)/bin/dpbench sweep benchmarks/cifar10.toml $(SWEEP_FLAGS)

sweep-imdb: install
	$(VENV)/bin/dpbench sweep benchmarks/imdb.toml $(SWEEP_FLAGS)

plots: install
	@for f in results/*/runs.csv; do $(VENV)/bin/dpbench plot $$f --published -o $${f%runs.csv}accuracy_vs_eps.png; done
	@for f in results/audit/*.csv; do case $$f in *.scores.csv) ;; *) $(VENV)/bin/dpbench plot $$f -o $${f%.csv}.png;; esac; done

# The privacy audit of every mechanism on MNIST (white-box canaries, 5000 training records; about 40 min of one core).
# GED runs 10 epochs (it is slow), and at eps 1 batch 128: at q = 512/5000 its Zhu-Wang bound cannot reach eps 1.
AUDIT_MECHS ?= dpsgd dpis modelmix rs auto_s psac psasc ged
audit: install
	$(VENV)/bin/dpbench audit --mech nonprivate --train-size 5000 --clip 5 --quiet --out results/audit/mnist.csv
	@for m in $(AUDIT_MECHS); do for e in 1 4 8; do \
	  $(VENV)/bin/dpbench audit --mech $$m --eps $$e --train-size 5000 --quiet --out results/audit/mnist.csv \
	    $$( [ $$m = ged ] && echo --epochs 10 ) $$( [ $$m$$e = ged1 ] && echo --batch-size 128 ) || exit 1; done; done

report: install
	@for f in results/*/runs.csv; do $(VENV)/bin/dpbench report $$f -o $${f%runs.csv}report.md --title "dpbench: $$(basename $$(dirname $$f))"; done

# The engine's cost against non-private training for every model of the speed targets (about an hour on 1 core).
BENCH_OUT ?= results/perf/cpu_$(shell date +%Y%m%d)
bench: install
	OMP_NUM_THREADS=1 $(PY) benchmarks/perf_table.py --out $(BENCH_OUT)

clean:
	rm -rf $(VENV) .pytest_cache
