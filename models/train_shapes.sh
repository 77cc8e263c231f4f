#!/bin/sh
# Retrain models/diffmesh-shapes (and its diamond LoRA) from nothing with our trainer, through
# `diffmesh train submit --launcher local`. Every phase prints its commands and wall time; see
# trainer/recipes/shapes.py for the phases and the sizes. DIFFMESH_DEVICE=cuda (or auto) trains on a GPU.
set -eu
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m trainer.recipes.shapes --out models/diffmesh-shapes --work build/shapes "$@"
