"""`partial`: the last `blocks` transformer blocks, the final norm and the head train; the rest stays frozen."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from vitflow.errors import VitflowError
from vitflow.training.strategies.base import Strategy


class PartialOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    blocks: int = Field(default=2, ge=1, description="how many of the last transformer blocks train")


class Partial(Strategy):
    name = "partial"
    Options = PartialOptions

    def trainable_modules(self, model, options: PartialOptions):
        if options.blocks > len(model.blocks):
            raise VitflowError(f"train.partial.blocks={options.blocks}: must be between 1 and {len(model.blocks)}, "
                               "the model's number of blocks")
        return [model.head, *model.blocks[-options.blocks:], model.final_norm]
