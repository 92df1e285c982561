# Sourced at the start of a device call: wheels, the `jaxbert` shim, GLUE data under /tmp/glue, a compilation
# cache under /tmp (the machine's /tmp lives while it stays warm). Carry .whl and scratch/budget/glue.tar.xz.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 XDG_CACHE_HOME=/tmp/xdg
mkdir -p /tmp/bin; printf '#!/bin/sh\nexec python3 -m jaxbert.cli "$@"\n' > /tmp/bin/jaxbert; chmod +x /tmp/bin/jaxbert
export PATH=/tmp/bin:$PATH
[ -d /tmp/glue ] || tar xJf scratch/budget/glue.tar.xz -C /tmp
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; python3 -c "import jax; print(jax.__version__, jax.devices())"
