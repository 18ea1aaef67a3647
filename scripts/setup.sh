#!/usr/bin/env bash
# Set up everything dicomnode and its tests need: Debian peers (dcmtk, PostgreSQL, Orthanc and
# its DICOMweb plugin, dicom3tools, Chromium for the dashboard and OHIF tests, npm) when missing,
# the Python virtual environment in .venv, and the OHIF viewer's prebuilt dist in .ohif/.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v storescu >/dev/null || need+=(dcmtk)
command -v dciodvfy >/dev/null || need+=(dicom3tools)
[ -x /usr/sbin/Orthanc ] || need+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
command -v chromium >/dev/null || need+=(chromium)
command -v npm >/dev/null || need+=(npm)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "setup: please install the Debian packages: ${need[*]}" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: the CPU wheel (found through pip's find-links) rather than PyPI's CUDA build
# with its gigabytes of nvidia packages, which an unpinned install would pull in.
if ! .venv/bin/python -c 'import torch' >/dev/null 2>&1; then
  echo "setup: installing torch==${TORCH_VERSION:-2.13.0}"
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
.venv/bin/python -m pip install -q -e '.[dev]'

# `docker compose config` checks deploy/compose.yaml in the tests. Without Docker's compose
# plugin, docker-compose 1.29 (the last Python one) does it, from a venv of its own: its pins
# (PyYAML<6) cannot build here, so it is installed without them and given PyYAML 6.
if ! docker compose version >/dev/null 2>&1 && [ ! -x .venv-compose/bin/docker-compose ]; then
  echo "setup: installing docker-compose 1.29.2 into .venv-compose (no compose plugin here)"
  "$PYTHON" -m venv .venv-compose
  .venv-compose/bin/python -m pip install -q --no-deps docker-compose==1.29.2
  .venv-compose/bin/python -m pip install -q "PyYAML>=6" "jsonschema<4" "python-dotenv<1" \
    docopt texttable distro cached-property dockerpty "docker>=5,<7" "requests<2.32" \
    "websocket-client<1"
fi

# The OHIF viewer (tests/integration/test_ohif.py, python -m dicomnode.testing.ohif probe): only
# the prebuilt dist/ of @ohif/app is used. `npm install` of it fails (it pins @ohif/i18n at its
# own version, which npm does not have), so the package alone is fetched and unpacked.
OHIF_VERSION=3.13.2
OHIF_APP=.ohif/node_modules/@ohif/app
if [ ! -e "$OHIF_APP/dist/index.html" ] && command -v npm >/dev/null; then
  echo "setup: fetching @ohif/app@${OHIF_VERSION} into $OHIF_APP"
  mkdir -p .ohif/pack "$OHIF_APP"
  tarball=$(npm pack --silent --pack-destination .ohif/pack "@ohif/app@${OHIF_VERSION}" | tail -1)
  tar -xzf ".ohif/pack/$tarball" -C "$OHIF_APP" --strip-components=1
  rm -f ".ohif/pack/$tarball"
fi
