#!/usr/bin/env bash
# Pack what bench/gpu_triton.py needs on a lent GPU machine that has Python 3.12 + torch but no
# network (docs/benchmarks.md, "GPU through the real Triton"): writes .gpu/ (git-ignored through
# .git/info/exclude) with
#   site.tar.xz       cp312 wheels the orchestrator imports and the machine lacks, plus the
#                     tritonserver of nvidia-pytriton 0.7.0 (its 3.12 stub only) and its libraries
#   stubsite.tar.xz   numpy 1.26.4 for the Python-backend stubs: tritonserver 2.51's stub answers
#                     empty output tensors under numpy 2 (seen here with Python 3.12, numpy 2.5)
#   pylib.tar.xz      a libpython3.12.so.1.0 (stripped), used only where the machine has none
#   tokenizer.tar.xz  the CLIP tokenizer files (build/models/tiny/diffusers/tokenizer)
# Run from the repository root after `make` (the venv holds nvidia-pytriton and the tiny models).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VENV:-.venv}"
SP="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
TOKENIZER="${TOKENIZER:-build/models/tiny/diffusers/tokenizer}"
PACK=.gpu
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
mkdir -p .git/info "$PACK"
grep -qx "/$PACK/" .git/info/exclude 2>/dev/null || echo "/$PACK/" >>.git/info/exclude

version() { "$VENV/bin/python" -m pip show "$1" 2>/dev/null | awk '/^Version:/{print $2}'; }
specs=()
for name in diffusers tritonclient python-rapidjson pydantic pydantic-core pydantic-settings \
  python-dotenv annotated-types typing-inspection tenacity opentelemetry-api opentelemetry-sdk \
  opentelemetry-semantic-conventions importlib-metadata; do
  specs+=("$name==$(version "$name")")
done
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
pip_target() {
  "$VENV/bin/python" -m pip install -q --no-deps --no-compile --only-binary=:all: \
    --python-version 3.12 --implementation cp "${platforms[@]}" --target "$@"
}
pip_target "$TMP/site" "${specs[@]}"
pip_target "$TMP/stubsite" numpy==1.26.4
rm -rf "$TMP/site/bin" "$TMP/stubsite/bin" "$TMP"/stubsite/numpy/*/tests "$TMP/stubsite/numpy/tests"

mkdir -p "$TMP/site/pytriton"
cp -r "$SP/pytriton/tritonserver" "$TMP/site/pytriton/"
cp -r "$SP/nvidia_pytriton.libs" "$TMP/site/"
find "$TMP/site/pytriton/tritonserver/python_backend_stubs" -mindepth 1 -maxdepth 1 \
  ! -name 3.12 -exec rm -rf {} +
rm -f "$TMP"/site/nvidia_pytriton.libs/libpython3-*.13.so* # the 3.13 stub's, unused

mkdir -p "$TMP/pylib"
PY312="${PY312:-$(command -v python3.12 || true)}"
LIBPY=""
if [ -n "$PY312" ]; then
  LIBPY="$("$PY312" -c 'import sysconfig, os; d = sysconfig.get_config_var("LIBDIR"); p = os.path.join(d, "libpython3.12.so.1.0"); print(p if os.path.exists(p) else "")' 2>/dev/null || true)"
fi
if [ -n "$LIBPY" ]; then
  cp "$LIBPY" "$TMP/pylib/" && strip --strip-unneeded "$TMP/pylib/libpython3.12.so.1.0"
else
  echo "no local libpython3.12.so.1.0: pylib.tar.xz will be empty" >&2
fi

tar -C "$TMP/site" -cf - . | xz -T0 -6 >"$PACK/site.tar.xz"
tar -C "$TMP/stubsite" -cf - . | xz -T0 -6 >"$PACK/stubsite.tar.xz"
tar -C "$TMP/pylib" -cf - . | xz -T0 -6 >"$PACK/pylib.tar.xz"
tar -C "$(dirname "$TOKENIZER")" -cf - "$(basename "$TOKENIZER")" | xz -T0 -6 >"$PACK/tokenizer.tar.xz"
du -sh "$PACK"/*
echo "carry $PACK; on the GPU machine run: bash bench/gpu_triton_device.sh"
