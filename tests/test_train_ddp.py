"""Two-process DDP training on the CPU (gloo): torchrun launch, rank-0-only outputs, identical weights."""
from __future__ import annotations

import json
import socket
import sys

import pytest
import torch

from tests.train_fixtures import CLI_OVERRIDES, ROOT, run_module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, overrides: list[str], dump_dir: str) -> None:
    """One spawned process: torchrun's environment, then the same `train` the CLI runs; afterwards each rank
    dumps its weights (a test-only file) so the parent can compare them."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    from hydra import compose, initialize_config_dir

    import segment.engine as engine
    from segment.train import train

    fitted = {"losses": []}
    original_fit, original_step = engine.Trainer.fit, engine.Trainer.train_step

    def fit_and_keep(self):
        fitted["model"] = self.model
        return original_fit(self)

    def step_and_keep(self, images, targets):
        values = original_step(self, images, targets)
        fitted["losses"].append(values[-1].item())  # this rank's own total loss, before any averaging
        return values

    engine.Trainer.fit = fit_and_keep
    engine.Trainer.train_step = step_and_keep
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    train(cfg)
    torch.save(fitted["model"].state_dict(), f"{dump_dir}/rank{rank}.pt")
    torch.save(fitted["losses"], f"{dump_dir}/losses{rank}.pt")


def test_two_process_ddp_keeps_ranks_identical_and_only_rank0_writes(tmp_path):
    out = tmp_path / "run"
    overrides = ["schedule=tiny", "schedule.max_iters=3", "schedule.warmup_iters=2", "schedule.warmup_factor=0.5",
                 f"output_dir={out}", f"data.root={tmp_path / 'data'}", "device=cpu", *CLI_OVERRIDES]
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    torch.multiprocessing.spawn(_rank_main, args=(_free_port(), overrides, str(dumps)), nprocs=2, join=True)

    rank0 = torch.load(dumps / "rank0.pt", weights_only=True)
    rank1 = torch.load(dumps / "rank1.pt", weights_only=True)
    torch.testing.assert_close(rank0, rank1, rtol=0, atol=0)
    final = torch.load(out / "model_final.pt", weights_only=True)["model"]
    torch.testing.assert_close(final, rank0, rtol=0, atol=0)
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["iter"] for e in entries] == [1, 2, 3]  # one writer: no duplicated lines
    assert all(e["images_per_s"] > 0 for e in entries)
    # the linear scaling rule counts both processes' images (2 x 2 of the paper's 16), then the warm-up scales it
    assert [e["lr"] for e in entries] == pytest.approx([0.02 * 4 / 16 * f for f in (0.5, 0.75, 1.0)])
    # each logged loss is the mean over the processes, not their sum
    losses = [torch.load(dumps / f"losses{rank}.pt", weights_only=True) for rank in range(2)]
    assert losses[0] != losses[1]
    assert [e["loss"] for e in entries] == pytest.approx([(a + b) / 2 for a, b in zip(*losses)], rel=1e-5)
    state = torch.load(out / "last.pt", weights_only=True)["training_state"]
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "last.pt", "metrics.jsonl", "model_final.pt"]


def test_torchrun_launch(tmp_path):
    out = tmp_path / "run"

    def launch():
        # warnings shown: torch 2.14's DDP warned "broadcast_buffers is deprecated" from each process
        return run_module(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
                           "-m", "segment.train", "schedule=tiny", f"output_dir={out}",
                           f"data.root={tmp_path / 'data'}", "device=cpu", "eval_every=2", *CLI_OVERRIDES],
                          env={"PYTHONWARNINGS": "default"})

    done = launch()
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1 and done.stdout.count("iter 2/2") == 1  # rank 0 alone prints
    assert done.stdout.count("eval @ iter 2") == 1  # rank 0 evaluated while rank 1 waited
    assert (out / "model_final.pt").is_file() and (out / "last.pt").is_file()
    assert "broadcast_buffers" not in done.stderr, done.stderr[-3000:]

    again = launch()  # every process stops with a user error: the user reads it once
    errors = [line for line in again.stderr.splitlines() if line.startswith("error: ")]
    assert again.returncode != 0 and len(errors) == 1 and "already holds a run" in errors[0], again.stderr[-3000:]
