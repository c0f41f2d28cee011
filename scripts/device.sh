#!/usr/bin/env bash
# The CUDA checks on the lent GPU machine (one H200): `make test-gpu` and benchmarks/gpu_check.py.
#
# That machine starts bare and reaches no registry. Its `python3` (3.12) has torch, torchvision,
# numpy, h5py, pillow, pandas, matplotlib, typer, rich, scikit-learn, fsspec, cupy and
# nvidia-ml-py, and not the rest of what loadbench and its tests need. So:
#
#   bash scripts/device.sh download
#       Here, on a machine with a registry: downloads those missing packages as cp312 manylinux
#       x86_64 wheels, one by one with --no-deps (the list below, pinned), into .device-wheels/
#       (ignored by git), then checks the folder: every dependency of every wheel is in it or on
#       the device's python, every dependency of pyproject.toml is shipped, known there, or left
#       out for a stated reason, and it is small enough to carry (the device run copies the work
#       tree and carried paths, 64 MiB in all). Prints the wheels and the folder's size.
#
#   bash scripts/device.sh run [all|tests|check]
#       There: makes .device-venv/ (python3 -m venv --system-site-packages), installs the carried
#       wheels with --no-index --no-deps, puts src/ on its path with a .pth file (no build backend
#       is needed), then runs `make test-gpu BIN=.device-venv/bin` (tests) and
#       `.device-venv/bin/python benchmarks/gpu_check.py` (check); `all` (the default) runs both,
#       the second even when the first fails. A test module that cannot be imported there is
#       reported and fails the step, and the gpu tests of the other modules still run. Logs and
#       the pytest JUnit XML go to $OUT when it is set (the device tool brings back what is
#       written there), else to a temporary folder. Exits non-zero when a step fails. Without
#       CUDA every test skips with its reason and gpu_check says so in one line.
#
# The device tool call (15 minutes of device time per task, all tries together; one command at
# most 600 s, so each step has its own timeout):
#
#   run  command: "bash scripts/device.sh run"   carry: [".device-wheels"]   timeout_s: 600
#
# after `bash scripts/device.sh download` here. To rerun one half: "bash scripts/device.sh run
# tests" or "... run check". A venv left by an earlier call on a still-warm machine is reused
# when it holds the same wheels.
#
# Settings (environment): PYTHON (the device's interpreter, default python3), DEVICE_PY (the
# Python version the wheels are for, default 3.12), WHEELS_DIR (default .device-wheels),
# DEVICE_VENV (default .device-venv), TEST_TIMEOUT and CHECK_TIMEOUT (seconds, defaults 240 and
# 300), GPU_CHECK_ARGS (extra arguments of gpu_check.py).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
WHEELS_DIR=${WHEELS_DIR:-.device-wheels}
DEVICE_VENV=${DEVICE_VENV:-.device-venv}
DEVICE_PY=${DEVICE_PY:-3.12}
PYTHON=${PYTHON:-python3}
TEST_TIMEOUT=${TEST_TIMEOUT:-240}
CHECK_TIMEOUT=${CHECK_TIMEOUT:-300}
MAX_WHEELS_MIB=48 # of the 64 MiB the device tool carries, the rest is for the work tree

# What the device's python lacks, pinned to the versions the project's .venv tests with. Update a
# pin here when pyproject.toml or .venv moves on; `download` checks the closure.
PACKAGES=(
  # storage formats and their dependencies
  zarr==3.1.6 donfig==0.8.1.post1 google-crc32c==1.9.0 numcodecs==0.16.6 crc32c==2.8
  lmdb==3.0.0 webdataset==1.0.2 braceexpand==0.1.7 protobuf==7.36.2
  array-record==0.8.6 absl-py==2.5.1 etils==1.15.0
  # options and records
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0 PyYAML==6.0.4
  # telemetry, synthetic sources (threadpoolctl comes with scikit-learn; pinned here all the same)
  psutil==7.2.2 threadpoolctl==3.8.0 packaging==26.3
  # the test extra (ruff, datasets, litdata and moto are left out: see LEFT_OUT)
  pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 pytest-xdist==3.8.0
  execnet==2.1.2 hypothesis==6.170.27 sortedcontainers==2.4.0
)
# Pure-Python packages whose release is published as source only: built here into a py3-none-any
# wheel (tfrecord's last wheel, 1.14.4, carries protobuf code that protobuf >= 4 refuses).
BUILT=(tfrecord==1.14.6)
# On the device's python already: the packages its page names, and what they depend on.
DEVICE_HAS="torch torchvision numpy h5py pillow pandas matplotlib typer rich scikit-learn fsspec
  cupy nvidia-ml-py scipy joblib filelock jinja2 sympy networkx setuptools python-dateutil pytz
  tzdata click shellingham markdown-it-py mdurl fastrlock"
# Dependencies of pyproject.toml not carried, and why (none of them is used by a gpu test).
LEFT_OUT="pyarrow=large (40 MB), imported by no loadbench module
s3fs=stores on object storage only (and pins fsspec to its own release)
ruff=lint only
datasets=peer loader (--format peers), its tests skip without it
litdata=peer loader (--format peers), its tests skip without it
tensorflow-cpu=peer loader, ~250 MB (over what the device tool carries); its tests skip without it
nvidia-dali-cuda130=peer loader, ~500 MB (over what the device tool carries); its tests skip without it
spdl=peer loader, with FFmpeg libraries (over what the device tool carries); its tests skip without it
grain=peer loader, with its dependencies (over what the device tool carries); its tests skip without it
streaming-community=peer loader, with its cloud SDKs (over what the device tool carries); its tests skip without it
moto=the S3 server of the remote-store tests"

say() { printf '\n== %s\n' "$*"; }

host_python() {
  # The interpreter whose pip downloads: the project's venv when there is one.
  if [ -x .venv/bin/python ]; then echo .venv/bin/python; else echo python3; fi
}

download() {
  local py tmp abi
  py=$(host_python)
  abi="cp${DEVICE_PY/./}"
  tmp="$WHEELS_DIR.partial"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  say "downloading ${#PACKAGES[@]} wheels for CPython $DEVICE_PY ($abi, manylinux x86_64) into $WHEELS_DIR"
  "$py" -m pip download --disable-pip-version-check --progress-bar off --no-deps \
    --only-binary=:all: --python-version "$DEVICE_PY" --implementation cp --abi "$abi" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --dest "$tmp" "${PACKAGES[@]}"
  say "building pure-Python wheels of ${BUILT[*]}"
  "$py" -m pip wheel --disable-pip-version-check --progress-bar off --no-deps \
    --no-binary=:all: --wheel-dir "$tmp" "${BUILT[@]}"
  local wheel
  for wheel in "$tmp"/*.whl; do
    case "$wheel" in
      *-none-any.whl | *-"$abi"-*.whl | *-abi3-*.whl) ;;
      *) echo "not a wheel for CPython $DEVICE_PY: $wheel" >&2 && exit 1 ;;
    esac
  done
  rm -rf "$WHEELS_DIR"
  mv "$tmp" "$WHEELS_DIR"
  say "checking $WHEELS_DIR"
  DEVICE_PY="$DEVICE_PY" DEVICE_HAS="$DEVICE_HAS" LEFT_OUT="$LEFT_OUT" \
    MAX_WHEELS_MIB="$MAX_WHEELS_MIB" "$py" - "$WHEELS_DIR" <<'EOF'
import os
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # pip carries its own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

folder = Path(sys.argv[1])
major, minor = os.environ["DEVICE_PY"].split(".")
marker_env = {
    "python_version": f"{major}.{minor}", "python_full_version": f"{major}.{minor}.0",
    "implementation_name": "cpython", "platform_python_implementation": "CPython",
    "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
    "os_name": "posix", "extra": "",
}
device = {canonicalize_name(n) for n in os.environ["DEVICE_HAS"].split()}
left_out = dict(line.split("=", 1) for line in os.environ["LEFT_OUT"].splitlines())
left_out = {canonicalize_name(k): v for k, v in left_out.items()}

wheels = {}
for path in sorted(folder.glob("*.whl")):
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(name).decode())
    wheels[canonicalize_name(meta["Name"])] = (meta["Version"], meta.get_all("Requires-Dist") or [],
                                               path)

problems, notes = [], []


def needed(requirement: str, by: str) -> None:
    req = Requirement(requirement)
    if req.marker is not None and not req.marker.evaluate(marker_env):
        return
    name = canonicalize_name(req.name)
    if name in wheels:
        version = wheels[name][0]
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            problems.append(f"{by} needs {req}, the folder has {name} {version}")
    elif name in device:
        if req.specifier:
            notes.append(f"{by} needs {req}: the device's own")
    elif name in left_out:
        notes.append(f"{by} needs {req}: left out ({left_out[name]})")
    else:
        problems.append(f"{by} needs {req}: neither in the folder nor on the device's python")


for name, (version, requires, _) in wheels.items():
    for requirement in requires:
        needed(requirement, f"{name} {version}")
try:
    import tomllib

    project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
        needed(requirement, "loadbench")
except ImportError:
    notes.append("pyproject.toml not checked (no tomllib in this Python)")

total = 0
for name, (version, _, path) in sorted(wheels.items()):
    size = path.stat().st_size
    total += size
    print(f"  {size / 2**20:6.2f} MiB  {path.name}")
print(f"  {total / 2**20:6.2f} MiB  in all, {len(wheels)} wheels")
for note in notes:
    print(f"  note: {note}")
limit = int(os.environ["MAX_WHEELS_MIB"])
if total > limit * 2**20:
    problems.append(f"the wheels take {total / 2**20:.1f} MiB, more than {limit} MiB")
for problem in problems:
    print(f"  PROBLEM: {problem}")
sys.exit(1 if problems else 0)
EOF
  say "$(du -sh "$WHEELS_DIR" | cut -f1) in $WHEELS_DIR; next, with the device tool:"
  echo '  run  command: "bash scripts/device.sh run"  carry: [".device-wheels"]  timeout_s: 600'
}

# -- on the device ---------------------------------------------------------------------------------

make_venv() {
  local bin="$DEVICE_VENV/bin" stamp="$DEVICE_VENV/.wheels" want
  want=$(cd "$WHEELS_DIR" && ls ./*.whl | sort)
  if [ -x "$bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    say "reusing $DEVICE_VENV (same wheels)"
    return
  fi
  local version
  version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ "$version" != "$DEVICE_PY" ]; then
    echo "$PYTHON is Python $version and the wheels are for $DEVICE_PY: set PYTHON, or" \
      "download for this one (DEVICE_PY=$version bash scripts/device.sh download)" >&2
    exit 2
  fi
  rm -rf "$DEVICE_VENV"
  say "making $DEVICE_VENV: $PYTHON -m venv --system-site-packages"
  if ! "$PYTHON" -m venv --system-site-packages "$DEVICE_VENV"; then
    echo "  (no ensurepip: a venv without pip, installed with the system's pip)"
    rm -rf "$DEVICE_VENV"
    "$PYTHON" -m venv --system-site-packages --without-pip "$DEVICE_VENV"
  fi
  say "installing $(echo "$want" | wc -l) wheels from $WHEELS_DIR (--no-index --no-deps)"
  if "$bin/python" -m pip --version >/dev/null 2>&1; then
    "$bin/python" -m pip install --disable-pip-version-check --no-index --no-deps \
      --no-warn-script-location --progress-bar off -q "$WHEELS_DIR"/*.whl
  else  # no pip anywhere: a wheel is a zip of what goes into site-packages
    echo "  (no pip: unpacking the wheels into the venv's site-packages)"
    "$bin/python" - "$WHEELS_DIR" <<'EOF'
import glob
import os
import shutil
import sys
import sysconfig
import zipfile

site = sysconfig.get_paths()["purelib"]
for wheel in sorted(glob.glob(os.path.join(sys.argv[1], "*.whl"))):
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
for data in glob.glob(os.path.join(site, "*.data")):  # purelib/platlib parts of a wheel
    for part in ("purelib", "platlib"):
        src = os.path.join(data, part)
        if os.path.isdir(src):
            shutil.copytree(src, site, dirs_exist_ok=True)
    shutil.rmtree(data)
EOF
  fi
  # loadbench itself: src/ on the venv's path (what an editable install does, with no build).
  "$bin/python" -c 'import sysconfig, sys; print(sys.argv[1], file=open(sysconfig.get_paths()["purelib"] + "/loadbench-src.pth", "w"))' "$ROOT/src"
  echo "$want" >"$stamp"
}

report_env() {
  say "device"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || true
  else
    echo "  no nvidia-smi"
  fi
  "$DEVICE_VENV/bin/python" - <<'EOF'
import importlib
import platform

import torch

import loadbench

print(f"python {platform.python_version()}, loadbench {loadbench.__version__} from "
      f"{loadbench.__file__}")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available: "
      f"{torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
for name in ("numpy", "cupy", "pynvml", "zarr", "numcodecs", "lmdb", "webdataset", "tfrecord",
             "pydantic", "yaml", "psutil", "h5py", "pandas", "pytest", "xdist", "hypothesis"):
    try:
        module = importlib.import_module(name)
        print(f"  {name} {getattr(module, '__version__', '?')}")
    except Exception as e:  # every missing piece is worth a line
        print(f"  {name}: cannot import: {type(e).__name__}: {e}")
EOF
}

run_tests() {
  say "make test-gpu BIN=$DEVICE_VENV/bin (timeout ${TEST_TIMEOUT}s)"
  local xml="$LOGS/test-gpu.xml"
  # A test module that cannot be imported there is reported (and fails the step), and the gpu
  # tests of every other module still run.
  export PYTEST_ADDOPTS="--junitxml=$xml -p no:cacheprovider --continue-on-collection-errors \
${PYTEST_ADDOPTS:-}"
  if command -v make >/dev/null; then
    timeout -k 10 "$TEST_TIMEOUT" make --no-print-directory test-gpu BIN="$DEVICE_VENV/bin" \
      2>&1 | tee "$LOGS/test-gpu.log"
  else
    echo "(no make here: the same pytest command)"
    timeout -k 10 "$TEST_TIMEOUT" "$DEVICE_VENV/bin/python" -m pytest -q -m gpu \
      2>&1 | tee "$LOGS/test-gpu.log"
  fi
}

run_check() {
  say "benchmarks/gpu_check.py (timeout ${CHECK_TIMEOUT}s)"
  # shellcheck disable=SC2086 # GPU_CHECK_ARGS is a list of words
  timeout -k 10 "$CHECK_TIMEOUT" "$DEVICE_VENV/bin/python" benchmarks/gpu_check.py \
    --json "$LOGS/gpu_check.json" ${GPU_CHECK_ARGS:-} 2>&1 | tee "$LOGS/gpu_check.txt"
}

run() {
  local what=${1:-all} failed=()
  case "$what" in all | tests | check) ;; *) usage ;; esac
  if ! compgen -G "$WHEELS_DIR/*.whl" >/dev/null; then
    echo "no wheels in $WHEELS_DIR: run 'bash scripts/device.sh download' first, and carry" \
      "[\"$WHEELS_DIR\"] with the device tool" >&2
    exit 2
  fi
  if [ -n "${OUT:-}" ]; then LOGS=$OUT; else LOGS=$(mktemp -d); fi
  mkdir -p "$LOGS"
  make_venv
  report_env 2>&1 | tee "$LOGS/env.txt"
  if [ "$what" != check ]; then run_tests || failed+=("make test-gpu (exit $?)"); fi
  if [ "$what" != tests ]; then run_check || failed+=("gpu_check.py (exit $?)"); fi
  say "logs in $LOGS"
  if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
  fi
  echo "all passed"
}

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 2
}

case "${1:-}" in
  download) download ;;
  run) run "${2:-all}" ;;
  *) usage ;;
esac
