#!/usr/bin/env bash
# Build the wheel folder that benchmarks/device_check.sh installs from on the GPU machine.
#
#   benchmarks/device_wheels.sh [DIR]        # default DIR: .whl (ignored by git)
#
# The GPU machine has no network and lacks some of our dependencies: their wheels are downloaded
# here, for its Python (3.12, CPython) and platform (manylinux x86-64), without their own
# dependencies (the machine has those: numpy, torch, transformers, huggingface-hub, safetensors,
# regex, requests, filelock, pillow, pyyaml, timm, tqdm, zipp). Versions are the ones this project's
# tests run with; override with PACKAGES="name==version ...". About 17 MB: carried with the tree.
set -eu
DIR="${1:-.whl}"
PY="${PYTHON:-python3}"
PACKAGES="${PACKAGES:-diffusers==0.42.1 pyzmq==27.3.0 braceexpand==0.1.7 kornia==0.9.0 kornia_rs==0.2.0 \
open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.5 importlib_metadata==10.2.0 webdataset==1.0.2}"
mkdir -p "$DIR"
# shellcheck disable=SC2086  # one word per package
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d "$DIR" $PACKAGES
ls -l "$DIR"
du -sh "$DIR"
