#!/usr/bin/env bash
# The wheels W&B 0.31 imports beyond what ../shared/device/wheels.sh fetches (OpenTelemetry, cwevals, click,
# protobuf, ...), for the GPU machine's Python 3.12, into .whl_otel/ (ignored by git): without them `import
# wandb` fails there with "No module named 'opentelemetry'". Versions follow this machine's wandb install.
# On the GPU machine: python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl_otel/*.whl
set -euo pipefail
root="$(git rev-parse --show-toplevel)"
dest="$root/.whl_otel"; mkdir -p "$dest"
grep -qx '/.whl_otel/' "$root/.git/info/exclude" 2>/dev/null || echo '/.whl_otel/' >> "$root/.git/info/exclude"
pkgs=(click cwevals distro sniffio protobuf googleapis-common-protos opentelemetry-api opentelemetry-sdk
      opentelemetry-semantic-conventions opentelemetry-proto opentelemetry-exporter-otlp-proto-http
      opentelemetry-exporter-http-transport opentelemetry-exporter-otlp-common opentelemetry-exporter-otlp-proto-common)
specs=()
for p in "${pkgs[@]}"; do
  v=$(python3 -m pip show "$p" 2>/dev/null | awk '/^Version:/{print $2}')
  specs+=("$p${v:+==$v}")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d "$dest" "${specs[@]}"
du -sh "$dest"
