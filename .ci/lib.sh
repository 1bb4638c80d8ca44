# The steps of .ci/run as functions, so that each can be tried on its own (tests/ci_script.rs
# runs `require_gxx` with g++ hidden from PATH and checks that CI stops there, saying why).
#
# Each `require_*` makes sure a tool the tests need is on this machine (installing it when
# it is missing and MEDCNN_CI_INSTALL is not 0) and exports the MEDCNN_REQUIRE_* variable that
# turns the matching test's "skipped: why" into a failure. A step that cannot be met prints
# `error: ...` on stderr and returns non-zero; .ci/run runs under `set -e`, so CI stops there.
#
# This file is sourced, not run: it only defines functions.

# Installs Debian packages with apt-get (through sudo when not root), unless MEDCNN_CI_INSTALL=0.
ci_install() {
  if [ "${MEDCNN_CI_INSTALL:-1}" = 0 ]; then
    echo "ci: not installing $* (MEDCNN_CI_INSTALL=0)" >&2
    return 1
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "ci: no apt-get on this machine to install $*" >&2
    return 1
  fi
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

# The C++ compiler of the kernel emulator (tests/kernels_emulated.rs): $CXX, else g++.
require_gxx() {
  local cxx="${CXX:-g++}"
  if ! "$cxx" --version >/dev/null 2>&1; then
    if [ -n "${CXX:-}" ] || ! ci_install g++ || ! g++ --version >/dev/null 2>&1; then
      echo "error: CI needs the C++ compiler \`$cxx\` for tests/kernels_emulated.rs (the CUDA kernels run on the CPU); install it (apt-get install -y g++) or point CXX at one" >&2
      return 1
    fi
  fi
  export MEDCNN_REQUIRE_GXX=1
}

# libnvrtc from the pinned wheel, for tests/kernels_compile.rs (pip into target/nvrtc).
require_nvrtc() {
  local dir="$PWD/target/nvrtc"
  if [ ! -e "$dir/nvidia/cu13/lib/libnvrtc.so.13" ]; then
    if [ "${MEDCNN_CI_INSTALL:-1}" = 0 ] || ! python3 -m pip install --quiet --disable-pip-version-check \
      --no-deps --target "$dir" nvidia-cuda-nvrtc==13.0.88; then
      echo "error: CI needs libnvrtc 13.0 for tests/kernels_compile.rs; pip install --target $dir nvidia-cuda-nvrtc==13.0.88 failed or was not allowed" >&2
      return 1
    fi
  fi
  export LD_LIBRARY_PATH="$dir/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export MEDCNN_REQUIRE_NVRTC=1
}

# Headless Chromium and chromedriver for the page's end-to-end test (tests/serve_browser.rs).
require_chromium() {
  if ! [ -x /usr/bin/chromium ] || ! [ -x /usr/bin/chromedriver ]; then
    if ! ci_install chromium chromium-driver; then
      echo "error: CI needs /usr/bin/chromium and /usr/bin/chromedriver for tests/serve_browser.rs (apt-get install -y chromium chromium-driver)" >&2
      return 1
    fi
  fi
  export MEDCNN_REQUIRE_CHROMIUM=1
}

# AVX-512F, for the unit tests that check the AVX-512 code of layers/direct_conv.rs,
# layers/winograd.rs and layers/winograd4.rs bit for bit against the portable code. Required where the CPU has it (so a
# detection that wrongly skips them fails CI); not every machine CI lands on does (an AMD EPYC
# of family 25 model 1, Zen 3, has AVX2 only), and there those tests print `skipped: why` and
# this step says, on stderr, that the AVX-512 code went unchecked in this run. The flags are
# read from $MEDCNN_CPUINFO (default /proc/cpuinfo), which tests/ci_script.rs points at a file.
require_avx512_where_present() {
  local cpuinfo="${MEDCNN_CPUINFO:-/proc/cpuinfo}"
  if grep -qE '^flags[[:space:]]*:.*[[:space:]]avx512f([[:space:]]|$)' "$cpuinfo" 2>/dev/null; then
    export MEDCNN_REQUIRE_AVX512=1
  else
    echo "ci: this CPU has no AVX-512F ($cpuinfo): the AVX-512-vs-portable unit tests print 'skipped' and the AVX-512 code is not checked in this run" >&2
  fi
}
