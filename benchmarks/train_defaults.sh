#!/usr/bin/env bash
# Trains the two built-in default models shipped in src/preempt_cli/weights/ with preempt's own
# `preempt train`, then measures them on the 932 CIFAR-10 test images (clean, PGD-20 L-inf 8/255).
#
# Both are short fine-tunes of public weights (provenance in README.md, "Built-in models"): training
# ResNet-20s from scratch to the targets takes hours on 2 CPU cores. The from-scratch recipe, for a GPU:
#   preempt train DATA.zip --arch cifar_resnet20 --arch-arg shortcut=pad_end --method fgsm-rs --epochs 30 ...
#
# Run from the repository root, with ../shared present:  bash benchmarks/train_defaults.sh
set -euo pipefail
DATA=../shared/data/cifar10/train-jpeg.zip
OUT=src/preempt_cli/weights
export PREEMPT_MODELS_DIR=../shared/models
mkdir -p "$OUT"

time preempt train "$DATA" --base cifar10-resnet20-pgdat-a --method fgsm-rs --epochs 2 --lr 0.02 \
    --schedule cosine --seed 0 --no-register --overwrite --out "$OUT/preempt_resnet20_at.safetensors"
time preempt train "$DATA" --base cifar10-resnet20-std --method standard --epochs 1 --lr 0.01 \
    --schedule cosine --seed 0 --no-register --overwrite --out "$OUT/preempt_resnet20_std.safetensors"
sha256sum "$OUT"/*.safetensors

# After pinning the sha256 values in models.toml: test accuracy of the shipped models.
preempt eval ../shared/data/cifar10/test --victim preempt-resnet20-at --victim preempt-resnet20-std \
    --defense none --attack pgd --out out/eval-defaults --json
