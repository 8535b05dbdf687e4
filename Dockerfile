# CUDA image for training and sampling on GPUs.
#   docker build --tag pfgmpp:latest .
#   docker run --gpus all -it --rm --user $(id -u):$(id -g) -v `pwd`:/scratch --workdir /scratch \
#       -e HOME=/scratch pfgmpp:latest torchrun --standalone --nproc_per_node=8 train.py ...
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /workspace/pfgmpp
COPY requirements.txt .
# The base image already ships a CUDA build of torch; install only what it lacks.
RUN grep -v '^torch' requirements.txt > /tmp/requirements-no-torch.txt \
    && pip install --no-cache-dir -r /tmp/requirements-no-torch.txt
COPY . .
