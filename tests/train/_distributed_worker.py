"""One process of a multi-process ``fit`` run (launched by tests/train/test_distributed.py).

Usage: ``python tests/train/_distributed_worker.py SPEC_JSON`` where the spec names the coordinator, the
process count and index, the run directory and the run's settings. XLA_FLAGS (4 CPU devices) comes from the
launcher's environment. Process 0 writes ``result.json`` (the run's records) into the run directory. With
``die_at_step`` set, the process with index ``die_process`` kills itself (SIGKILL) before that step.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(spec: dict) -> None:
    from oftjax.train import initialize

    initialize(
        spec["coordinator"], spec["num_processes"], spec["process_id"], heartbeat_timeout=spec["heartbeat"]
    )
    import jax
    from flax import nnx

    jax.config.update("jax_numpy_dtype_promotion", "strict")
    from oftjax.train import Trainer, fit, make_mesh
    from oftjax.train._distributed import exit_on_peer_failure
    from tests.train._distributed_run import config, data, write_adapter
    from tests.train._tiny import TinyLM

    if spec.get("die_at_step") is not None and spec["process_id"] == spec["die_process"]:
        step = Trainer.train_step

        def train_step(self, batch):
            if self.step + 1 == spec["die_at_step"]:
                os.kill(os.getpid(), signal.SIGKILL)
            return step(self, batch)

        Trainer.train_step = train_step
    train, evald = data()
    with exit_on_peer_failure("worker"):
        res = fit(
            TinyLM(vocab=259),
            config(**spec.get("config", {})),
            train,
            eval_data=evald,
            output_dir=spec["output_dir"],
            wrt=nnx.Param if spec.get("wrt") == "all" else None,
            mesh=make_mesh(*spec["mesh"]),
            write_adapter=write_adapter,
            resume=spec.get("resume", False),
            progress=False,
            stop_after=spec.get("stop_after"),
        )
    if jax.process_index() == 0:
        out = {"records": res.records, "start_step": res.start_step, "process_count": jax.process_count()}
        (Path(spec["output_dir"]) / "result.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
