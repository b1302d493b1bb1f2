"""`full`: every parameter of the pretrained model trains, the backbone at `lr_backbone`, the head at `lr_head`."""

from vitflow.training.strategies.base import Strategy


class Full(Strategy):
    name = "full"
