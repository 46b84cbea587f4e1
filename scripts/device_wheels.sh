#!/usr/bin/env bash
# Wheels the device machine lacks, for Python 3.12 there (run here, where pip reaches a registry):
#   .whl/      the server and its tests: fastapi, starlette, pydantic(-core), uvicorn, openai and
#              the dependencies the device image does not have (about 6 MB)
#   .rayslim/  Ray's wheel (79 MB: more than one call carries) unpacked without what a cluster of
#              engine actors never imports (Java jars, RLlib, Data, Serve, Tune, Train, LLM, the
#              dashboard's web client) and packed again with xz (about 28 MB), plus jsonschema
#              with its dependencies
# One device call carries both (scripts/gpu_check.sh installs them: steps serve, cluster, multigpu).
set -euo pipefail
fetch() {
  local dir=$1; shift
  mkdir -p "$dir"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$dir" "$@"
}
fetch .whl fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 \
  uvicorn==0.54.0 typing-inspection==0.4.5 annotated-types==0.8.0 openai==3.57.0 jiter==0.19.0 \
  distro==1.9.0 opentelemetry-api==1.45.2 httpx2==2.16.2 httpcore2==2.16.2 \
  typing_extensions==4.16.0 sniffio==1.3.1 truststore==0.10.5
tmp=$(mktemp -d)
fetch "$tmp" ray==2.60.0
fetch .rayslim jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 \
  rpds-py==2026.9.1
python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" \
  "$tmp"/ray-2.60.0-*.whl "$tmp/x"
(cd "$tmp/x/ray" && rm -rf jars rllib data serve llm tune train dashboard/client \
  && chmod -R u+x core/src)  # zipfile drops the modes: Ray's servers must be executable
tar -C "$tmp/x" -cJf .rayslim/ray-slim.tar.xz .
rm -rf "$tmp"
du -sh .whl .rayslim
