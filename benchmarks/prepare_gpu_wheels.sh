#!/usr/bin/env bash
# Prepares, on a machine with network, what benchmarks/gpu_check.py needs on the offline GPU machine:
#   wheels/*.whl                             the project's pure-Python dependencies missing there (ml_collections)
#   wheels/data/cifar10-train-jpeg.tar.gz    the CIFAR-10 JPEG training images (a copy of ../shared/data's)
# wheels/ is ignored by git; send it along with the checkout (about 16 MB; the device tool's `carry: ["wheels"]`).
#
# The GPU machine has JAX (CUDA), flax, optax, orbax-checkpoint, transformers, tokenizers, safetensors, pillow,
# tqdm, absl-py, PyYAML and PyTorch. Of imgllm's dependencies only ml_collections is missing; tensorflow-datasets
# is too, but imgllm imports it only to read tfds datasets, which the check does not (its native dependencies,
# array_record and dm-tree, would not come as pure-Python wheels anyway).
#
#   bash benchmarks/prepare_gpu_wheels.sh                      # the defaults below
#   PACKAGES="ml_collections==1.1.0 other==1.0" bash benchmarks/prepare_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TARBALL=${TARBALL:-../shared/data/cifar10-train-jpeg.tar.gz}
PACKAGES=${PACKAGES:-ml_collections==1.1.0}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}     # the GPU machine's python3

mkdir -p wheels/data
# shellcheck disable=SC2086  # PACKAGES is a list of requirement specifiers
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
  --platform manylinux2014_x86_64 -d wheels $PACKAGES
install -m 0644 "$TARBALL" wheels/data/cifar10-train-jpeg.tar.gz
du -sh wheels
ls -l wheels wheels/data
