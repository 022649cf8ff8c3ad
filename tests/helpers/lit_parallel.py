"""One rank of a Lightning ``ModelParallelStrategy`` run (tensor parallel, or FSDP2 x tensor
parallel) of the layout tests' block, with the gradwatch callback: its report as JSON.

The processes are started by the test (as ``torchrun`` would start them): with ``LOCAL_RANK`` set,
Lightning takes them as created outside and launches nothing.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import layouts


def worker(rank: int, world: int, port: int, data_parallel: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
        LOCAL_RANK=str(rank), NODE_RANK="0", LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    from gradwatch import GradWatchCallback

    class LitBlock(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.block = layouts.make_block()

        def configure_model(self) -> None:
            mesh = self.device_mesh
            parallelize_module(self.block, mesh["tensor_parallel"], layouts.tp_plan())
            if mesh["data_parallel"].size() > 1:
                for part in (self.block.attn, self.block.mlp, self.block):
                    fully_shard(part, mesh=mesh["data_parallel"])

        def training_step(self, batch, batch_idx):
            x, y = batch
            return layouts.loss_of(self.block(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    x, y = layouts.global_batch()
    loader = DataLoader(TensorDataset(x, y), batch_size=layouts.BATCH // data_parallel)
    callback = GradWatchCallback(every_n_steps=1)
    strategy = ModelParallelStrategy(
        data_parallel_size=data_parallel, tensor_parallel_size=world // data_parallel
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="lightning|torch")
        trainer = pl.Trainer(
            accelerator="cpu", devices=world, strategy=strategy, max_steps=1, logger=False,
            callbacks=[callback],
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(LitBlock(), loader)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"report": callback.report.to_dict()}))
