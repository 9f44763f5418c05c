#!/usr/bin/env bash
# A separate venv, .venv-gallery, with published libraries whose recurrent modules the export
# gallery (tests/test_gallery.py, tests/gallery/) exports, verifies and streams: speechbrain,
# pytorch-forecasting, darts, asteroid, neuralforecast and flair, at pinned versions, beside
# torch 2.13.0 and rnnzoo itself (editable, so the tests run this checkout's export_module).
# It also holds the silero-vad package, whose ONNX files tests/test_contract_silero.py serves.
#
# torch is installed first and every later install runs under a constraints file that pins
# it, so no library can replace it. Three libraries are installed with --no-deps and their
# runtime dependencies by hand:
# - speechbrain and asteroid require torchaudio, whose PyPI wheel is a CUDA build (its
#   compiled extensions need libc10_cuda.so) and `import speechbrain` imports it. Its
#   pure-Python part loads when those extensions are absent (torchaudio checks for the
#   files), and the recurrent modules used here need nothing else of it: it is installed with
#   --no-deps and its lib/*.so removed;
# - asteroid pins torchmetrics<=0.11.4, which pytorch-forecasting's lightning cannot use;
# - neuralforecast requires ray[train,tune] and tornado; `import neuralforecast` imports
#   ray.tune (its Auto* models), not ray.train: ray[tune] and its other dependencies by hand.
# silero-vad is installed with --no-deps: only its data files (the ONNX graphs) are used.
#
# Idempotent and cached: a second run only checks the installed versions against the pins
# recorded in the venv (under a second). A first run, measured on the shared 2-core machine
# with PyPI reachable and torch from the local wheel: 4-9 min wall (about 2 min of CPU; the
# rest is downloads and the other engineers' load), 2.6 GB on disk.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-gallery
TORCH=torch==2.13.0
SPEECHBRAIN=speechbrain==1.1.2
FORECASTING=pytorch-forecasting==1.8.0
DARTS=darts==0.48.1
ASTEROID=asteroid==0.7.0
FILTERBANKS=asteroid-filterbanks==0.4.0
TORCHAUDIO=torchaudio==2.11.1
NEURALFORECAST=neuralforecast==3.3.0
FLAIR=flair==0.15.1
RAY=ray[tune]==2.60.0
SILERO=silero-vad==6.2.3
PINS="$TORCH $SPEECHBRAIN $FORECASTING $DARTS $ASTEROID $FILTERBANKS $TORCHAUDIO $NEURALFORECAST $RAY $FLAIR $SILERO"
STAMP=$VENV/gallery-pins.txt
CHECK='import torch, speechbrain.nnet.RNN, pytorch_forecasting.models.nn.rnn, asteroid.masknn.recurrent, neuralforecast.models, flair.models, onnxscript, rnnzoo.export, importlib.resources as r
from darts.models.forecasting import rnn_model, block_rnn_model
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert r.files("silero_vad.data").joinpath("silero_vad.onnx").is_file()'

# The stamp is written only after CHECK (every library imported) passed: a second run reads
# the installed versions instead of importing them again (that import takes 15-45 s here).
QUICK='import sys
from importlib.metadata import version
want = dict(p.split("==") for p in sys.argv[1:])
sys.exit(any(not version(k.split("[")[0]).startswith(v) for k, v in want.items()))'
# shellcheck disable=SC2086
if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$PINS" ] &&
    "$VENV/bin/python" -c "$QUICK" $PINS 2>/dev/null; then
    exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PIP=("$VENV/bin/python" -m pip install -q)
echo "$TORCH" >"$VENV/constraints.txt"
C=(-c "$VENV/constraints.txt")
"${PIP[@]}" "$TORCH"
# rnnzoo, editable, with its serving and export dependencies (not [dev]: pytest runs outside)
"${PIP[@]}" "${C[@]}" -e '.[train]'
# the libraries that install cleanly with their own dependencies
"${PIP[@]}" "${C[@]}" "$FORECASTING" "$DARTS" "$FLAIR"
# speechbrain, asteroid (and torch-stoi, which asteroid needs) without their torchaudio and
# asteroid's torchmetrics pin: their remaining runtime dependencies by hand
"${PIP[@]}" "${C[@]}" --no-deps "$SPEECHBRAIN" "$ASTEROID" "$FILTERBANKS" "$TORCHAUDIO" \
    torch-stoi
"${PIP[@]}" "${C[@]}" hyperpyyaml joblib packaging requests scipy sentencepiece soundfile \
    tqdm huggingface_hub pyyaml pandas pytorch-lightning julius pb-bss-eval pystoi \
    "torch-optimizer<0.2.0"
rm -f "$VENV"/lib/python3*/site-packages/torchaudio/lib/*.so
"${PIP[@]}" "${C[@]}" --no-deps "$NEURALFORECAST"
"${PIP[@]}" "${C[@]}" "$RAY" coreforecast utilsforecast fsspec safetensors optuna tornado
"${PIP[@]}" --no-deps "$SILERO"
"$VENV/bin/python" -c "$CHECK"
echo "$PINS" >"$STAMP"
