"""Worker for test_training_stats: two torchrun ranks report different values and compare the reduced result."""

import json
import sys

import torch

from torch_utils import distributed as dist
from torch_utils import training_stats


def main() -> None:
    dist.init(device='cpu')
    rank = dist.get_rank()
    values = torch.arange(4.0) if rank == 0 else 10 + torch.arange(6.0)
    training_stats.report('Loss/loss', values)
    training_stats.report0('Only/zero', 5.0)
    collector = training_stats.Collector(regex='(Loss|Only)/.*')
    training_stats.report('Loss/loss', values)  # reported after creation: this is the interval
    training_stats.report0('Only/zero', 5.0)
    collector.update()
    result = dict(loss=dict(collector.as_dict()['Loss/loss']), only0=dict(collector.as_dict()['Only/zero']))
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, result)
    if rank == 0:
        with open(sys.argv[1], 'w') as f:
            json.dump(dict(rank0=gathered[0], rank1=gathered[1]), f)
    dist.shutdown()


if __name__ == '__main__':
    main()
