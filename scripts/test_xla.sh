#!/usr/bin/env bash
# Run the torch_xla tests (tests/test_xla.py, marker `xla`) on this CPU machine with PJRT_DEVICE=CPU.
#
#   bash scripts/test_xla.sh              # all xla tests
#   bash scripts/test_xla.sh -k resume    # extra arguments go to pytest
#
# torch_xla 2.9.0 (the newest release) is built against torch 2.9.0 exactly and cannot be imported
# beside the project's torch (each torch_xla release pins one torch release), so the first run builds a throwaway virtualenv
# ($XLA_VENV, default /tmp/xla-venv) with torch==2.9.0 + torch_xla==2.9.0 + the project's
# dependencies from the package registry. PyPI has only the CUDA build of torch 2.9.0 for linux
# x86_64: about 4 GB of downloads (7 GB unpacked), several minutes. Later runs reuse the virtualenv.
# The project itself is not installed there: the tests run with PYTHONPATH=<repo>.
#
# The checkpoint written by the XLA path is then sampled with sample.py under the *outer* python
# ($MAIN_PYTHON, default: the python3 on PATH when this script starts), i.e. the project's own torch.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=${XLA_VENV:-/tmp/xla-venv}
MAIN_PYTHON=${MAIN_PYTHON:-$(command -v python3)}
DEPS=(torch==2.9.0 torch_xla==2.9.0 numpy einops pillow scipy pytest tqdm)

venv_ready() {  # every package importable at the pinned versions
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - <<'EOF' 2>/dev/null
import einops, numpy, PIL, pytest, scipy, tqdm  # noqa: F401
import torch, torch_xla
assert torch.__version__.split("+")[0] == "2.9.0", torch.__version__
assert torch_xla.__version__.split("+")[0] == "2.9.0", torch_xla.__version__
EOF
}

if ! venv_ready; then
    echo "building $VENV (torch 2.9.0 + torch_xla 2.9.0, ~4 GB download; once)" >&2
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    # pip install is idempotent: a half-built virtualenv from an interrupted run is completed.
    "$VENV/bin/python" -m pip install -q "${DEPS[@]}"
    venv_ready || { echo "error: $VENV still cannot import torch 2.9.0 + torch_xla 2.9.0" >&2; exit 1; }
fi
"$MAIN_PYTHON" -c "import torch" || { echo "error: MAIN_PYTHON=$MAIN_PYTHON cannot import torch" >&2; exit 1; }

# SEMANTICA_REQUIRE_XLA: here a missing torch_xla is an error, not a skip (CI skips these tests).
export PJRT_DEVICE=CPU SEMANTICA_REQUIRE_XLA=1 SEMANTICA_MAIN_PYTHON="$MAIN_PYTHON"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$VENV/bin/python" -m pytest -m xla -q -p no:cacheprovider tests/test_xla.py "$@"
