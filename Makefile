# dg-lightning: `make install && make demo` on a fresh machine; `make test` for the tests.
PYTHON      ?= python3
VENV        ?= .venv
CONSTRAINTS ?= constraints.txt
BIN         := $(VENV)/bin
PACS_ROOT   ?= $(shell [ -d ../shared/data/pacs ] && echo ../shared/data/pacs)
DG_DATA     ?= $(shell [ -d ../shared/data ] && echo ../shared/data)
SEEDS       ?= 0 1
# bench-pacs picks its seeds from the hardware (GPU 0 1 2, CPU 0 1) unless SEEDS is given
SEEDS_ARG   := $(if $(filter command line environment,$(origin SEEDS)),--seeds $(SEEDS))
MNIST_METHODS ?= ERM CORAL GroupDRO

export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1
ifneq ($(PACS_ROOT),)
export PACS_ROOT
endif
ifneq ($(DG_DATA),)
export DG_DATA
endif

.PHONY: install demo test test-fast bench-pacs bench-pacs-methods bench-pacs-baselines bench-mnist bench-mnist-paper bench-seg bench-issa bench-pacs-ssl bench-identifiability bench-speed bench-speed-cuda bench-steptime bench-steptime-ssl readme-numbers lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

## a complete leave-one-domain-out experiment on the embedded dataset (no download), table at the end
demo: install
	$(BIN)/dg-lightning lodo --config experiments/demo/erm.yaml --seeds $(SEEDS) --out runs/demo

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

## ERM on real PACS (PACS_ROOT) on the hardware found: on a GPU DomainBed's paper-scale protocol (ResNet-50
## ImageNet, 224 px, 5,000 steps, bf16, seeds 0 1 2, ETA first); on the CPU two tables (ResNet-18 64 px, lite0 96 px)
bench-pacs: install
	$(BIN)/python -m dg_lightning.bench.pacs --suite erm $(SEEDS_ARG)

## ERM vs RISE vs GCISG on real PACS, pretrained lite0 at 96 px, same schedule and seeds
bench-pacs-methods: install
	$(BIN)/python -m dg_lightning.bench.pacs --suite methods --seeds $(SEEDS) --out bench/pacs-methods

## DomainBed's ColoredMNIST and RotatedMNIST, LODO, ERM + two baselines at a CPU schedule, published ERM beside
bench-mnist: install
	$(BIN)/python -m dg_lightning.bench.mnist --methods $(MNIST_METHODS) --seeds $(SEEDS) --out bench/mnist

## the same at DomainBed's full protocol (5,000 steps, default hparams, 3 seeds): for a GPU
bench-mnist-paper: install
	$(BIN)/python -m dg_lightning.bench.mnist --scale paper --methods ERM --seeds 0 1 2 --out bench/mnist-paper

## DomainBed baselines: ERM vs CORAL vs ERM + SWAD on real PACS, pretrained lite0 at 96 px, same schedule and seeds
bench-pacs-baselines: install
	$(BIN)/python -m dg_lightning.bench.pacs --suite baselines --seeds $(SEEDS) --out bench/pacs-baselines

## segmentation DG: ERM vs GCISG, DeepLabV3+ lite0, real Cityscapes -> Cityscapes val, CamVid, CamVid dusk
bench-seg: install
	$(BIN)/python -m dg_lightning.bench.seg --seeds $(SEEDS) --out bench/seg

## ISSA, tiny: StyleGAN2 + masked noise encoder on real Cityscapes, then ERM vs ERM+ISSA as in bench-seg
bench-issa: install
	$(BIN)/python -m dg_lightning.bench.issa --seeds $(SEEDS) --out bench/issa

## SimCLR vs SimCLR+DDM vs multi-space on real PACS, ResNet-18 from scratch at 64 px, linear probes
bench-pacs-ssl: install
	$(BIN)/python -m dg_lightning.bench.pacs --suite ssl --seeds $(SEEDS) --out bench/pacs-ssl

## the synthetic identifiability setting of multi-space disentanglement: R² matrices (no data needed)
bench-identifiability: install
	$(BIN)/python -m dg_lightning.bench.identifiability --out bench/identifiability.json

## seconds per training step of ERM, RISE and GCISG on the same batch (pretrained lite0, 96 px)
bench-steptime: install
	$(BIN)/python -m dg_lightning.bench.steptime --configs experiments/cpu/pacs_erm_lite0.yaml \
		experiments/cpu/pacs_rise_lite0.yaml experiments/cpu/pacs_gcisg_lite0.yaml --steps 8 --out bench/steptime.json

## seconds per training step of the three SSL configs of bench-pacs-ssl
bench-steptime-ssl: install
	$(BIN)/python -m dg_lightning.bench.steptime --configs experiments/cpu/pacs_ssl_simclr.yaml \
		experiments/cpu/pacs_ssl_ddm.yaml experiments/cpu/pacs_ssl_multispace.yaml --steps 5 --out bench/steptime-ssl.json

## images/s: compute limit vs the per-sample and batched data paths vs DomainBed's loop (ERM, GCISG; CPU)
bench-speed: install
	$(BIN)/python -m dg_lightning.bench.speed --out bench/speed.json

## the same on a CUDA GPU: ResNet-50 224 px, batch 32 x 3, bf16, worker sweep up to the cores, on a copy
## of the data with its files at PACS's original 227 px (the shared copy is 96 px)
bench-speed-cuda: install
	$(BIN)/python -m dg_lightning.bench.speed --device cuda --file-side 227 --out bench/speed-cuda.json

## the README's measured tables, re-rendered from results/ (see results/README.md)
readme-numbers: install
	$(BIN)/python -m dg_lightning.eval.readme_numbers

lint: install
	$(BIN)/ruff check dg_lightning tests

clean:
	rm -rf runs bench .pytest_cache
