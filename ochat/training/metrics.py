"""SAVE/metrics.jsonl (rank 0): one JSON record per optimiser step and per evaluation, plus TensorBoard or W&B."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ochat.errors import OchatError
from ochat.training.args import TrainArgs
from ochat.training.distributed import Dist
from ochat.utils.atomic import atomic_write_text


def _step_of(line: str) -> float:
    """The step of a metrics line; a line cut short by a crash counts as not written."""
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):
        return math.inf


class MetricsLog:
    """SAVE/metrics.jsonl (rank 0), plus TensorBoard or W&B when asked for."""

    def __init__(self, save: Path, args: TrainArgs, d: Dist, resume_step: int):
        self.enabled = d.is_main
        self.path = save / "metrics.jsonl"
        self.tb = self.wandb = None
        if not self.enabled:
            return
        if self.path.exists():
            # Drop records of steps that the resumed run will redo.
            keep = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in keep))
        self.file = open(self.path, "a", encoding="utf-8")
        if args.report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise OchatError("--report-to tensorboard needs the package tensorboard (pip install tensorboard)") from None
            self.tb = SummaryWriter(str(save / "tensorboard"))
        elif args.report_to == "wandb":
            try:
                import wandb
            except ImportError:
                raise OchatError("--report-to wandb needs the package wandb (pip install wandb)") from None
            self.wandb = wandb.init(project=Path(args.model).name, config=args.to_json(), dir=str(save))
        elif args.report_to != "none":
            raise OchatError(f"--report-to {args.report_to}: expected none, tensorboard or wandb")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record.get("step", 0)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
