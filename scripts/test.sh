#!/usr/bin/env bash
# Install what the tests need, then run every test of the workspace.
# Used by developers (the README's second command) and by CI (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO_CMD=""
if [ "$(id -u)" -ne 0 ]; then SUDO_CMD="sudo"; fi
need_apt=()
# dcmtk: a real third-party reader of our outputs, and the encoder of compressed fixtures.
command -v dcmdump >/dev/null 2>&1 || need_apt+=(dcmtk)
# cmake and a C++ compiler build CharLS for the JPEG-LS decoder (cargo feature jpegls).
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
# dcm2niix: the reference converter our volumes must overlay.
command -v dcm2niix >/dev/null 2>&1 || need_apt+=(dcm2niix)
# Orthanc is the PACS the node pulls from and is pushed to; curl drives its REST API.
command -v Orthanc >/dev/null 2>&1 || need_apt+=(orthanc)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
# OpenSSL verifies the consortium PKI's certificates and revocation list.
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# The power-loss harness: loop-mounted XFS and ext4 images, shut down with xfs_io.
command -v mkfs.xfs >/dev/null 2>&1 || need_apt+=(xfsprogs)
command -v mkfs.ext4 >/dev/null 2>&1 || need_apt+=(e2fsprogs)
command -v losetup >/dev/null 2>&1 || need_apt+=(mount)
# GNU time reports the peak memory of the node under hostile inputs.
[ -x /usr/bin/time ] || need_apt+=(time)
# procps: kill and pgrep (signals to the demo and the services under test).
command -v pgrep >/dev/null 2>&1 || need_apt+=(procps)
# systemd-analyze verifies the example deployment's units.
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
# OpenJPEG's encoder makes the JPEG 2000 fixtures.
command -v opj_compress >/dev/null 2>&1 || need_apt+=(libopenjp2-tools)
# gdcmanon (GDCM): one of the anchors `bench --anchors` times beside us (its smoke test).
command -v gdcmanon >/dev/null 2>&1 || need_apt+=(libgdcm-tools)
# The web annotator's browser tests: Debian's chromium driven through chromedriver, and the
# viewer (NiiVue, pinned in web/package-lock.json) installed by npm from Debian's Node.js.
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
command -v npm >/dev/null 2>&1 || need_apt+=(nodejs npm)
# The Python reference for harmonisation (its golden outputs are committed in tests/golden;
# scripts/reference/harmonise_reference.py regenerates them and the test script checks they
# are still what the reference computes).
if ! python3 -c "import intensity_normalization" >/dev/null 2>&1; then
  python3 -m pip install --quiet "intensity-normalization==2.2.4"
fi
# The references for annotation: agreement and consensus (statsmodels, krippendorff,
# SimpleITK, medpy; golden outputs in tests/golden, made by
# scripts/reference/annotate_reference.py) and the formats (pycocotools, nibabel, highdicom and
# dcmqi read what the node writes, in the tests), in an environment of their own
# (scripts/reference/annotate-requirements.txt says why).
annotate_py="$PWD/target/py-annotate/bin/python"
if ! "$annotate_py" -c "import statsmodels, krippendorff, SimpleITK, medpy.metric.binary, pycocotools, nibabel, highdicom, dcmqi" >/dev/null 2>&1; then
  if ! python3 -m venv target/py-annotate >/dev/null 2>&1; then
    $SUDO_CMD apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO_CMD apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv target/py-annotate
  fi
  "$annotate_py" -m pip install --quiet -r scripts/reference/annotate-requirements.txt
fi
export FEDCURATE_ANNOTATE_PYTHON="$annotate_py"
# Federated training: the Python client's example trainers (numpy, safetensors,
# scikit-learn's digits) and Google's dp-accounting, which the accountant is checked against.
./scripts/train-python.sh
export FEDCURATE_TRAIN_PYTHON="$PWD/target/py-train/bin/python"
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need_apt[*]}"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# The orthanc package may start a system service on its default ports; the tests run their
# own instance on free loopback ports, so stop it if it runs (harmless if it does not).
if command -v service >/dev/null 2>&1; then
  $SUDO_CMD service orthanc stop >/dev/null 2>&1 || true
fi
./scripts/web-assets.sh
for tool in chromium chromedriver dcmdump dcmcjpeg dcmcjpls cmake opj_compress dcm2niix Orthanc curl storescu echoscu mkfs.xfs mkfs.ext4 xfs_io mount /usr/bin/time; do
  command -v "$tool" >/dev/null 2>&1 || { echo "$tool is required by the tests and could not be installed" >&2; exit 1; }
done

# The committed golden outputs must be exactly what the pinned reference computes today.
regen=$(mktemp)
python3 scripts/reference/harmonise_reference.py > "$regen"
if ! cmp -s "$regen" tests/golden/harmonise-2.2.4.json; then
  # FCM starts from random memberships in the reference: compare all but FCM exactly.
  python3 - "$regen" tests/golden/harmonise-2.2.4.json <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
for name in a["methods"]:
    if name.startswith("fcm"):
        continue
    if a["methods"][name] != b["methods"][name]:
        sys.exit(f"golden output of {name} differs from intensity-normalization 2.2.4: regenerate tests/golden")
PY
fi
rm -f "$regen"
regen=$(mktemp)
"$annotate_py" scripts/reference/annotate_reference.py > "$regen"
python3 - "$regen" tests/golden/annotate-reference.json <<'PY'
import json, math, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
def same(x, y, where):
    if isinstance(x, dict) and isinstance(y, dict):
        if where == "versions":
            return
        if x.keys() != y.keys():
            sys.exit(f"{where}: keys differ")
        for k in x:
            same(x[k], y[k], k if where == "" else f"{where}.{k}")
    elif isinstance(x, list) and isinstance(y, list):
        if len(x) != len(y):
            sys.exit(f"{where}: lengths differ")
        for i, (p, q) in enumerate(zip(x, y)):
            same(p, q, f"{where}[{i}]")
    elif isinstance(x, float) or isinstance(y, float):
        if not math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12):
            sys.exit(f"{where}: {x} != {y}: regenerate tests/golden/annotate-reference.json")
    elif x != y:
        sys.exit(f"{where}: {x!r} != {y!r}: regenerate tests/golden/annotate-reference.json")
same(a, b, "")
PY
rm -f "$regen"

log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --all-targets --locked --features tests/jpegls 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
# One closing line over every test binary (cargo prints one per binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
[ "$rc" -eq 0 ] || exit "$rc"

# A bounded fuzzing campaign of every target (inputs a stranger controls), recorded in
# node/fuzz/ledger.tsv; a new finding is printed with where it is kept (committed findings are
# replayed by the tests above and fail them until fixed).
fuzz_seconds=${FUZZ_SECONDS:-30}
if [ "$fuzz_seconds" -gt 0 ]; then
  FUZZ_SECONDS="$fuzz_seconds" FUZZ_REPORT_ONLY=1 ./scripts/fuzz.sh
  # Pixel decoding again under AddressSanitizer: the C and C++ codecs behind it are where a
  # memory error would hide (a build of its own; FUZZ_ASAN=0 leaves it out).
  if [ "${FUZZ_ASAN:-1}" != 0 ]; then
    FUZZ_SECONDS="$fuzz_seconds" FUZZ_REPORT_ONLY=1 FUZZ_SANITIZER=address ./scripts/fuzz.sh pixel_decode
  fi
fi
