#!/bin/sh
# The project itself, without dependencies: locks/train.txt (installed by train.yaml) holds all of them. Snakemake
# copies this script to .snakemake/conda/<hash>.post-deploy.sh and runs it in the new env, so "../.." is the
# workflow root.
set -eu
python -m pip install --no-deps -e "$(dirname "$0")/../.."
