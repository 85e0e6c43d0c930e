"""Body of one rank of a shard launch where rank 1 fails to load while rank 0 is still busy.

Runs the real ``text-generation-server serve`` entry point with the model
loader replaced: rank 1's load raises a checkpoint error, rank 0's takes two
minutes (a peer still loading or already serving). Writes ``{out}/rank{r}.json``
with the exit code and how long the entry point took.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def run_rank(rank: int, world_size: int, port: int, model_dir: str, out_dir: str) -> None:
    """Entry point for ``torch.multiprocessing``."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import text_generation_server.models as models
    from text_generation_server.cli import main
    from text_generation_server.weights import CheckpointError

    def load_model(*args, **kwargs):
        if rank == 1:
            raise CheckpointError("tensor 'model.layers.0.mlp.down_proj.weight' cannot be split for rank 1")
        time.sleep(120)
        raise RuntimeError("rank 0 was expected to be stopped before this")

    models.load_model = load_model
    started = time.monotonic()
    code = main(["serve", model_dir, "--uds-path", str(Path(out_dir) / f"shard{rank}")])
    (Path(out_dir) / f"rank{rank}.json").write_text(
        json.dumps({"code": code, "seconds": time.monotonic() - started})
    )
