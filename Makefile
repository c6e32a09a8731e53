# One-command set-up: `make run` (the pipeline on the embedded default data) and `make test`.
# `make setup` is idempotent: it reinstalls only when pyproject.toml or constraints.txt (every other package's
# version, as the tests last passed with it) changed since the last install.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
POCUS := ../shared/data/pocus

export DVC_NO_ANALYTICS := 1
# dvc stages call `sonossl`: the one from this venv.
export PATH := $(BIN):$(PATH)

.PHONY: setup exps-links run test ran bench label-seeds pretext-rates selection-oracle label-levers crossval-seeds pipeline-time gpu-check drift-demo serve-example results contact-sheet image image-push clean
setup: $(STAMP) exps-links

# Queued and --temp DVC experiments (`dvc exp run --queue`, `--temp`) run in copies of the repository under
# .dvc/tmp/exps/, where the POCUS dataset's path, ../shared/data/pocus, would point inside .dvc/tmp: these links
# send it to the ../shared beside the checkout.
exps-links:
	@if [ -d $(POCUS) ]; then mkdir -p .dvc/tmp/exps/standalone \
	  && ln -sfn $(abspath ../shared) .dvc/tmp/exps/shared \
	  && ln -sfn $(abspath ../shared) .dvc/tmp/exps/standalone/shared; fi

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

# The POCUS stage needs the real videos beside the repository; without them, everything else still runs.
run: setup
	@if [ -d $(POCUS) ]; then dvc repro; \
	else echo "note: $(POCUS) not found: skipping preprocess@pocus and crossval"; dvc repro export evaluate; fi
	@echo "results: reports/results.md (and reports/crossval.md); \`make results\` copies them into README.md"

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# What the benchmarks and demos below read from `make run`: a clear stop before them instead of a traceback.
ran: setup
	@for p in data/clips/sim models/export models/pretrain/both-sequential/encoder.pt; do \
	  test -e $$p || { echo "make $(MAKECMDGOALS): $$p is missing: run \`make run\` first"; exit 2; }; done

bench: ran
	@if [ -d ../shared/data/pocus ]; then $(BIN)/python benchmarks/preprocess.py --repeats 5; \
	else echo "make bench: ../shared/data/pocus is missing: the preprocess benchmark (POCUS videos) is skipped"; fi
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/serve.py

# The smallest label fraction over five seeds, SSL against scratch (after `make run`; about 5 minutes on 2 cores).
label-seeds: ran
	$(BIN)/python benchmarks/label_seeds.py --seeds 5

# The same draws: the test score of what validation selects against the best test score any selection could reach
# (a diagnosis of whether selection holds the result back; after `make run`; 12.8 min on 2 cores beside the tests).
# As recorded: with every encoder stage at one rate ($(NODECAY), below; without it, the profile's decay), on the
# pipeline's encoder as it was pretrained then ($(LR0): first built and kept in models/bench/lr5e-4, with one draw).
selection-oracle: ran
	$(BIN)/python benchmarks/label_seeds.py $(LR0) $(E8) --seeds 1 --save-encoder models/bench/lr5e-4 \
		--out models/bench/lr5e-4.json
	$(BIN)/python benchmarks/selection_oracle.py --seeds 5 $(NODECAY) --encoder models/bench/lr5e-4

# Held-out pretext accuracy of the pipeline's both-sequential encoder pretrained at several peak rates, at smaller
# batch sizes, with three pretraining seeds at the old and the new rate, with the order loss weighted 2x and 4x, at
# clip strides 6 and 24, and at crops 48 and 64 with and without jitter, at the pipeline's cost
# (docs/EXPERIMENTS.md, "the pretraining rate"; after `make run`; about 46 minutes on 2 cores), all at 8 epochs, the
# pipeline's until it pretrained its own encoder 24 (the ablation's encoders still train 8); last, 1 and 3 epochs of
# warm-up at 24 epochs, three seeds each, then ten more seeds each (3-12; 52.5 min). The records in
# benchmarks/results carry the machine they ran on in their names (--out): pretext_rates_avx2.json,
# pretext_batch_avx2.json, pretext_seeds_avx2.json, pretext_order_weight_avx2.json, pretext_stride_avx2.json,
# pretext_crop_shift_avx2.json, pretext_warmup_e24_epyc_avx512.json, pretext_warmup_e24_seeds3-12_epyc_avx512.json.
pretext-rates: ran
	$(BIN)/python benchmarks/pretext_rates.py --epochs 8
	$(BIN)/python benchmarks/pretext_rates.py --epochs 8 --lr 1e-3 2e-3 4e-3 --batch-size 32 16 \
		--out benchmarks/results/pretext_batch.json
	$(BIN)/python benchmarks/pretext_rates.py --epochs 8 --lr 5e-4 2e-3 --seeds 3 \
		--out benchmarks/results/pretext_seeds.json
	$(BIN)/python benchmarks/pretext_rates.py --epochs 8 --lr 2e-3 --order-weight 2 4 --seeds 3 \
		--out benchmarks/results/pretext_order_weight.json
	$(BIN)/python benchmarks/pretext_rates.py --epochs 8 --lr 2e-3 --stride 6 24 --clips-per-epoch 1936 --seeds 3 \
		--out benchmarks/results/pretext_stride.json
	$(BIN)/python benchmarks/pretext_rates.py --epochs 8 --lr 2e-3 --crop 48 64 --max-shift 0 16 --seeds 3 \
		--out benchmarks/results/pretext_crop_shift.json
	$(BIN)/python benchmarks/pretext_rates.py --epochs 24 --lr 2e-3 --warmup-epochs 1 3 --seeds 3 \
		--out benchmarks/results/pretext_warmup_e24.json
	$(BIN)/python benchmarks/pretext_rates.py --epochs 24 --lr 2e-3 --warmup-epochs 1 3 --seeds 10 --first-seed 3 \
		--out benchmarks/results/pretext_warmup_e24_seeds3-12.json

# The label-seeds comparison for what might make the gain larger (docs/EXPERIMENTS.md, the levers): a lower
# fine-tune LR, LP-FT, the ablation encoders, 3x and 7.5x the pretraining, 128 and 256 more unlabelled sweeps, 128
# more with 3x the pretraining; the default encoder at 20 % of the videos; heads on the last 3 encoder stages;
# layer-wise decay of a pretrained encoder's fine-tune rate, on the pipeline's encoder and on two encoders kept in
# models/bench (with draws 5-9 for the one it was chosen on), and a second build of the best encoder (pool seed 3);
# a pool rendered at 5 frames/s at the pipeline's pretraining cost and at 3x it (two builds), against 3x and 6x the
# pretraining on the training sweeps, over ten draws; the pretraining rate 2e-3 over ten draws; two more encoders at
# each of 2e-3 and 5e-4 (pretraining seeds 1 and 2), over ten draws each; the pipeline's encoder at 20% and at 100%,
# over ten draws each; the three ablation encoders of the pipeline, over ten draws; 3x the pretraining at 2e-3 (two
# builds, ten draws each: the pipeline's encoder since then, and another seed), and that encoder against its 8-epoch
# twin at 20 % and 100 %, draw by draw (benchmarks/encoder_pairs.py); a moving average of the fine-tunes' weights
# (finetune.ema 0.95) over ten draws; the seed-1 build of 3x the pretraining with 3 epochs of warm-up (on the AVX-512
# EPYC its 1-epoch twin's order head stayed at chance), and the pipeline's own build (seed 0) with 3 epochs of
# warm-up. About 431 minutes on 2 cores.
# Decay 0.5 became the default after most of these were measured; $(NODECAY) runs those as they were (every stage at
# one rate). The pretraining rate 2e-3 became the default after all of them but the last five commands; $(LR0)
# pretrains their encoders, and the pipeline's, at the rate they had (5e-4). The order-only and both-parallel rows
# of five draws read the pipeline's own ablation encoders, so they now measure the ones pretrained at 2e-3.
LEVERS := benchmarks/results/label_seeds
NODECAY := --encoder-lr-decay 1
LR0 := --pretrain-lr 5e-4
# The pretraining epochs of every encoder built before the default became 24 (8 before 4c6d92d, which added the last
# three commands), and the pipeline's encoder as it was then: its 8-epoch twin, pretrain@both-sequential-ablation.
E8 := --pretrain-epochs 8
ENC8 := --encoder models/pretrain/both-sequential-ablation
# 128 unlabelled sweeps rendered at 5 frames/s, pretrained at the pipeline's cost (the default profile's 1,936 clips)
POOL5 := --pool-videos 128 --pool-fps 5 --clips-per-epoch 1936
label-levers: setup
	$(BIN)/python benchmarks/label_seeds.py $(LR0) $(E8) $(NODECAY) --lr 3e-4 --out $(LEVERS)_lr3e-4.json
	$(BIN)/python benchmarks/label_seeds.py $(LR0) $(E8) $(NODECAY) --head-init probe --encoder-lr-scale 0.1 \
		--out $(LEVERS)_lpft.json
	$(BIN)/python benchmarks/label_seeds.py $(NODECAY) --encoder models/pretrain/order --out $(LEVERS)_order.json
	$(BIN)/python benchmarks/label_seeds.py $(NODECAY) --encoder models/pretrain/both-parallel \
		--out $(LEVERS)_parallel.json
	$(BIN)/python benchmarks/label_seeds.py $(LR0) $(NODECAY) --pretrain-epochs 24 --save-encoder models/bench/e24 \
		--out $(LEVERS)_pretrain24.json
	$(BIN)/python benchmarks/label_seeds.py $(LR0) $(NODECAY) --pretrain-epochs 60 --out $(LEVERS)_pretrain60.json
	$(BIN)/python benchmarks/label_seeds.py $(LR0) $(E8) $(NODECAY) --pool-videos 128 --out $(LEVERS)_pool128.json
	$(BIN)/python benchmarks/label_seeds.py $(LR0) $(E8) $(NODECAY) --pool-videos 256 --out $(LEVERS)_pool256.json
	$(BIN)/python benchmarks/label_seeds.py $(LR0) $(NODECAY) --pool-videos 128 --pretrain-epochs 24 \
		--save-encoder models/bench/pool128_e24 \
		--out $(LEVERS)_pool128_e24.json
	$(BIN)/python benchmarks/label_seeds.py $(LR0) $(E8) $(NODECAY) --fraction 0.2 --out $(LEVERS)_f20.json
	$(BIN)/python benchmarks/label_seeds.py $(LR0) $(E8) $(NODECAY) --pool-stages 3 --out $(LEVERS)_pool_stages3.json
	$(BIN)/python benchmarks/label_seeds.py $(NODECAY) --encoder models/bench/pool128_e24 --pool-stages 3 \
		--out $(LEVERS)_pool128_e24_pool_stages3.json
	$(BIN)/python benchmarks/label_seeds.py $(LR0) $(E8) --encoder-lr-decay 0.5 --out $(LEVERS)_decay0.5.json
	$(BIN)/python benchmarks/label_seeds.py --encoder models/bench/e24 --encoder-lr-decay 0.5 \
		--out $(LEVERS)_pretrain24_decay0.5.json
	for d in 0.5 0.25; do $(BIN)/python benchmarks/label_seeds.py --encoder models/bench/pool128_e24 \
		--encoder-lr-decay $$d --out $(LEVERS)_pool128_e24_decay$$d.json || exit 1; done
	$(BIN)/python benchmarks/label_seeds.py $(NODECAY) --encoder models/bench/pool128_e24 --first-seed 5 \
		--out $(LEVERS)_pool128_e24_seeds5-9.json
	$(BIN)/python benchmarks/label_seeds.py --encoder models/bench/pool128_e24 --encoder-lr-decay 0.5 --first-seed 5 \
		--out $(LEVERS)_pool128_e24_decay0.5_seeds5-9.json
	$(BIN)/python benchmarks/label_seeds.py $(LR0) --pool-videos 128 --pool-seed 3 --pretrain-epochs 24 \
		--save-encoder models/bench/pool128s3_e24 --out $(LEVERS)_pool128s3_e24_decay0.5.json
	$(BIN)/python benchmarks/label_seeds.py --encoder models/bench/pool128s3_e24 --first-seed 5 \
		--out $(LEVERS)_pool128s3_e24_decay0.5_seeds5-9.json
	$(BIN)/python benchmarks/label_seeds.py $(NODECAY) --encoder models/bench/pool128s3_e24 \
		--out $(LEVERS)_pool128s3_e24.json
	$(BIN)/python benchmarks/label_seeds.py $(NODECAY) --encoder models/bench/pool128s3_e24 --first-seed 5 \
		--out $(LEVERS)_pool128s3_e24_seeds5-9.json
	$(BIN)/python benchmarks/label_seeds.py $(LR0) $(E8) --first-seed 5 --out $(LEVERS)_decay0.5_seeds5-9.json
	$(BIN)/python benchmarks/label_seeds.py $(LR0) $(E8) $(POOL5) --out $(LEVERS)_pool128f5_c1936.json
	$(BIN)/python benchmarks/label_seeds.py $(LR0) $(E8) $(POOL5) --first-seed 5 \
		--out $(LEVERS)_pool128f5_c1936_seeds5-9.json
	$(BIN)/python benchmarks/label_seeds.py --encoder models/bench/e24 --first-seed 5 \
		--out $(LEVERS)_pretrain24_decay0.5_seeds5-9.json
	$(BIN)/python benchmarks/label_seeds.py $(LR0) --pretrain-epochs 48 --save-encoder models/bench/e48 \
		--out $(LEVERS)_pretrain48_decay0.5.json
	$(BIN)/python benchmarks/label_seeds.py --encoder models/bench/e48 --first-seed 5 \
		--out $(LEVERS)_pretrain48_decay0.5_seeds5-9.json
	$(BIN)/python benchmarks/label_seeds.py $(LR0) $(POOL5) --pretrain-epochs 24 \
		--save-encoder models/bench/pool128f5_c1936_e24 --out $(LEVERS)_pool128f5_c1936_e24.json
	$(BIN)/python benchmarks/label_seeds.py --encoder models/bench/pool128f5_c1936_e24 --first-seed 5 \
		--out $(LEVERS)_pool128f5_c1936_e24_seeds5-9.json
	$(BIN)/python benchmarks/label_seeds.py $(LR0) $(POOL5) --pool-seed 3 --pretrain-epochs 24 \
		--save-encoder models/bench/pool128s3f5_c1936_e24 --out $(LEVERS)_pool128s3f5_c1936_e24.json
	$(BIN)/python benchmarks/label_seeds.py --encoder models/bench/pool128s3f5_c1936_e24 --first-seed 5 \
		--out $(LEVERS)_pool128s3f5_c1936_e24_seeds5-9.json
	$(BIN)/python benchmarks/label_seeds.py --pretrain-lr 2e-3 $(E8) --seeds 10 --save-encoder models/bench/lr2e-3 \
		--out $(LEVERS)_pretrain_lr2e-3.json
	for s in 1 2; do for r in 2e-3 5e-4; do $(BIN)/python benchmarks/label_seeds.py --pretrain-lr $$r $(E8) \
		--pretrain-seed $$s --seeds 10 --save-encoder models/bench/lr$$r-s$$s \
		--out $(LEVERS)_pretrain_lr$${r}_seed$$s.json || exit 1; done; done
	$(BIN)/python benchmarks/label_seeds.py $(ENC8) --fraction 0.2 --seeds 10 --out $(LEVERS)_f20_lr2e-3.json
	$(BIN)/python benchmarks/label_seeds.py $(ENC8) --fraction 1 --seeds 10 --out $(LEVERS)_f100_lr2e-3.json
	for m in order transform both-parallel; do $(BIN)/python benchmarks/label_seeds.py \
		--encoder models/pretrain/$$m --seeds 10 --out $(LEVERS)_ablation_$${m}_lr2e-3.json || exit 1; done
	$(BIN)/python benchmarks/label_seeds.py --pretrain-epochs 24 --seeds 10 --save-encoder models/bench/lr2e-3_e24 \
		--out $(LEVERS)_pretrain24_lr2e-3.json
	$(BIN)/python benchmarks/label_seeds.py --pretrain-epochs 24 --pretrain-seed 1 --seeds 10 \
		--out $(LEVERS)_pretrain24_lr2e-3_seed1.json
	$(BIN)/python benchmarks/encoder_pairs.py --against models/pretrain/both-sequential-ablation --fractions 0.2 1 \
		--seeds 10 --out benchmarks/results/encoder_pairs_e24_vs_e8.json
	$(BIN)/python benchmarks/label_seeds.py --ema 0.95 --seeds 10 --out $(LEVERS)_ema0.95.json
	$(BIN)/python benchmarks/label_seeds.py --pretrain-epochs 24 --pretrain-seed 1 --pretrain-warmup 3 --seeds 10 \
		--out $(LEVERS)_pretrain24_seed1_warmup3.json
	$(BIN)/python benchmarks/label_seeds.py --pretrain-epochs 24 --pretrain-warmup 3 --seeds 10 \
		--out $(LEVERS)_pretrain24_warmup3.json

# The POCUS cross-validation over seven seeds (folds, inner validation patients, initialisations), SSL against
# scratch; seed 0 is the pipeline's own run (after `dvc repro crossval`; about 65 minutes on 2 cores). The README's
# medians are its run on the Intel Xeon, kept as benchmarks/results/crossval_seeds_flip_intel.json.
crossval-seeds: setup
	$(BIN)/python benchmarks/crossval_seeds.py --seeds 7

# Wall time of every stage against the budgets: `dvc repro --force` (after `make run`; as long as the pipeline, about 16
# min on the Intel Xeon of 2f8a53e), then the machine_speed yardstick. Nothing else should run beside it.
pipeline-time: setup
	$(BIN)/python benchmarks/pipeline_time.py

# The GPU check (issue 3, item 8): the gpu profile's pretraining for a few hundred steps on this machine's GPU
# (README, Training throughput): 8 sweeps of 500 frames, then about 400 steps at batch 256; writes
# benchmarks/results/gpu_check.json. Not yet run on a GPU.
gpu-check: setup
	$(BIN)/python benchmarks/gpu_check.py

# Serve four kinds of traffic to the default model and write a drift report per window (after `make run`).
drift-demo: ran
	$(BIN)/python benchmarks/drift_cases.py

# The README's serving example: one held-out sweep through the real server (after `make run`).
serve-example: ran
	$(BIN)/python benchmarks/serve_example.py

# Copy the results table of the last `dvc repro` (reports/results.md) into the README, between its markers.
results: setup
	$(BIN)/python -m sonossl.cli readme-results --results reports/results.md --readme README.md

contact-sheet: setup
	sonossl contact-sheet --raw data/raw/sim --out docs/contact_sheet.png --per-class 6 --real $(POCUS)

# The one image (Dockerfile): cpu variant tagged <TAG>, cuda variant <TAG>-cuda; TAG is the package version unless
# given (TAG=0.1.0-$(git rev-parse --short HEAD) for unreleased code: nodes do not pull a tag they hold);
# VARIANTS=cpu (or cuda) builds and pushes one of them. Needs Docker.
IMAGE ?= ghcr.io/sonossl/sonossl
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
TAG ?= $(VERSION)
VARIANTS ?= cpu cuda
tag = $(IMAGE):$(TAG)$(if $(filter cpu,$(1)),,-$(1))
image:
	$(foreach v,$(VARIANTS),docker build --build-arg VARIANT=$(v) --build-arg SONOSSL_VERSION=$(VERSION) \
		-t $(call tag,$(v)) . &&) true

image-push: image
	$(foreach v,$(VARIANTS),docker push $(call tag,$(v)) &&) true

clean:
	rm -rf $(VENV) .pytest_cache
