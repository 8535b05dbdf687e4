# CUDA image for training, sampling and evaluation on GPUs, with the torch that requirements.txt pins.
#   docker build --tag pfgmpp:latest .
#   docker run --gpus all -it --rm --user $(id -u):$(id -g) -v `pwd`:/scratch --workdir /scratch \
#       -e HOME=/scratch pfgmpp:latest torchrun --standalone --nproc_per_node=8 train.py ...
#   docker run --gpus all --rm pfgmpp:latest bash bench/gpu_check.sh      # every CUDA path once
#
# A devel image: --compile needs a C compiler (Triton builds its launchers, Inductor its CPU kernels) and the CUDA
# headers, which the runtime images lack. CUDA 13.0 needs an NVIDIA driver >= 580; on older drivers build with
#   --build-arg CUDA_TAG=cuda12.6-cudnn9   (driver >= 525)
ARG TORCH_VERSION=2.13.0
ARG CUDA_TAG=cuda13.0-cudnn9
FROM pytorch/pytorch:${TORCH_VERSION}-${CUDA_TAG}-devel
ARG TORCH_VERSION

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# The compiler, unless the base image already has one.
RUN command -v cc >/dev/null || (apt-get update && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*)
WORKDIR /workspace/pfgmpp
COPY requirements.txt .
# The base image ships the CUDA build of torch; install only what it lacks, and refuse a torch other than the pin.
RUN grep -v '^torch==' requirements.txt > /tmp/requirements-no-torch.txt \
    && pip install --no-cache-dir -r /tmp/requirements-no-torch.txt \
    && grep -qx "torch==${TORCH_VERSION}" requirements.txt \
    && python -c "import sys, torch; v = torch.__version__.split('+')[0]; \
sys.exit(0 if v == sys.argv[1] else f'torch {v} in the image; requirements.txt pins {sys.argv[1]}')" \
        "${TORCH_VERSION}" \
    && python -c "import torch; torch.compile(lambda x: x.sin() + 1)(torch.ones(4))"
COPY . .
