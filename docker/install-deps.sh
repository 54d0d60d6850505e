#!/bin/sh
# Build-time installer for the image's Python dependencies (docker/Dockerfile runs it in
# the build stage, in /src with pyproject.toml beside it, into the active venv).
#
# Where the wheels come from is the build's choice, never a silent fallback:
#   WHEELHOUSE=/wheels   every wheel from the directory alone (--no-index): air-gapped;
#   otherwise            torch/torchvision from TORCH_INDEX only, the rest from PIP_INDEX_URL.
# torch is installed on its own, from its own index, so an unreachable TORCH_INDEX fails the
# build (after PIP_RETRIES short tries) instead of pip finding the CUDA build on PyPI.
# TORCH_VARIANT (cpu|cuda) is then checked against the torch that was installed.
set -eu

variant=${TORCH_VARIANT:-cpu}
case "$variant" in
  cpu | cuda) ;;
  *) echo "TORCH_VARIANT must be cpu or cuda, not '$variant'" >&2; exit 2 ;;
esac

# The pins live in pyproject.toml alone: read them from there (Python 3.11's tomllib).
python - >/tmp/requirements.txt <<'PY'
import tomllib

with open("pyproject.toml", "rb") as f:
    pyproject = tomllib.load(f)
project = pyproject["project"]
for requirement in (
    pyproject["build-system"]["requires"]
    + project["dependencies"]
    + project["optional-dependencies"]["pretrained"]
):
    print(requirement)
PY
grep -E '^(torch|torchvision)==' /tmp/requirements.txt >/tmp/torch.txt

# Fail before the rest is installed when the torch that came is not the kind asked for.
check_torch_variant() {
  TORCH_VARIANT=$variant python - <<'PY'
import os
import sys

import torch

wanted = os.environ["TORCH_VARIANT"]
built_for = "cpu" if torch.version.cuda is None else "cuda"
print(f"torch {torch.__version__} ({built_for}) installed; TORCH_VARIANT={wanted}")
if built_for != wanted:
    sys.exit(
        f"torch {torch.__version__} is a {built_for} build but TORCH_VARIANT={wanted}: "
        "point TORCH_INDEX (or the wheelhouse) at the matching wheels, or set TORCH_VARIANT"
    )
PY
}

if [ -n "${WHEELHOUSE:-}" ]; then
  echo "installing from the wheelhouse $WHEELHOUSE only" >&2
  pip install --no-index --find-links "$WHEELHOUSE" -r /tmp/torch.txt
  check_torch_variant
  pip install --no-index --find-links "$WHEELHOUSE" -r /tmp/requirements.txt
else
  echo "installing torch from $TORCH_INDEX, the rest from $PIP_INDEX_URL" >&2
  pip install --index-url "$TORCH_INDEX" -r /tmp/torch.txt
  check_torch_variant
  pip install --index-url "$PIP_INDEX_URL" -r /tmp/requirements.txt
fi

rm -f /tmp/requirements.txt /tmp/torch.txt
