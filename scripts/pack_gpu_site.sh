#!/usr/bin/env bash
# Packs the Python packages the lent GPU machine lacks (av, kornia, hydra-core and theirs, pycocotools) into one
# xz archive, .gpu-wheels/site.tar.xz, for scripts/device_checks.sh. The device tool sends at most 64 MiB with a
# call: the tracked tree (28 MB) plus the wheels as downloaded (42 MB, av's alone 35 MB) did not fit; unpacked and
# packed again with xz, they take 30 MB.
# hydra-core 1.3 needs antlr4-python3-runtime 4.9.*, which PyPI has as a source archive only: its pure-Python files
# are copied from this checkout's .venv (the newest wheel, 4.13, fails hydra's grammar: "Could not deserialize ATN").
# Usage: bash scripts/pack_gpu_site.sh   (here, with .venv built; about 2 minutes)
# Then on the GPU machine (carry [".gpu-wheels", ".cache/styles"]):
#   mkdir -p /tmp/site && tar xJf .gpu-wheels/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
    --platform manylinux2014_x86_64 --no-deps -d "$work/wheels" av kornia kornia_rs hydra-core omegaconf pycocotools
mkdir "$work/site"
for wheel in "$work"/wheels/*.whl; do
    .venv/bin/python -m zipfile -e "$wheel" "$work/site"
done
antlr=$(.venv/bin/python -c "import antlr4, os; print(os.path.dirname(antlr4.__file__))")
cp -r "$antlr" "$antlr"/../antlr4_python3_runtime-4.9.3.dist-info "$work/site/"
find "$work/site" -name __pycache__ -prune -exec rm -rf {} +
mkdir -p .gpu-wheels
tar cf - -C "$work/site" . | xz -9e -T2 > .gpu-wheels/site.tar.xz.part
mv .gpu-wheels/site.tar.xz.part .gpu-wheels/site.tar.xz
du -h .gpu-wheels/site.tar.xz
