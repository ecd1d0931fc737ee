# The one image every Kubeflow component runs in: CUDA runtime, our dependencies (pyproject.toml), the sb2 package,
# and the sample data at /app/data/samples (the tiny profile's relative paths). Build: `make image`.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH HF_HOME=/mnt/sb2/hf-cache
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv $VIRTUAL_ENV
WORKDIR /app
# Dependencies first (a layer that changes only with pyproject.toml), then the package.
COPY pyproject.toml README.md ./
RUN mkdir sb2 && touch sb2/__init__.py && pip install --upgrade pip && pip install . && pip uninstall -y sb2
COPY sb2 sb2
COPY data/samples data/samples
# The check loads the multi-node job templates too: package data, not only code.
RUN pip install --no-deps . && python -c "import sb2.cli, sb2.kfp.tasks, kfp, accelerate, kubernetes; \
    from sb2.kfp.multinode import load_template; load_template('TrainJob'); load_template('PyTorchJob')"
