"""Worker for test_distributed: launched under torchrun, checks an all-reduce over gloo."""

import json
import os
import sys

import torch

from torch_utils import distributed as dist_utils


def main() -> None:
    device = dist_utils.init(device='cpu')
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    value = torch.tensor([float(rank + 1)], device=device)
    dist_utils.all_reduce(value)
    gathered = dist_utils.broadcast_object({'from': rank})
    mine = dist_utils.shard(range(10))
    if dist_utils.is_main():
        with open(sys.argv[1], 'w') as f:
            json.dump(dict(world=world, total=value.item(), gathered=gathered, shard0=mine), f)
    dist_utils.barrier()
    dist_utils.shutdown()


if __name__ == '__main__':
    main()
