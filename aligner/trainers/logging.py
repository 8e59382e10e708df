"""Where a run's metrics go: a console progress bar, TensorBoard and Weights & Biases.

One :class:`MetricsLogger` per process; only the logging rank (the trainer
picks one) is ``enabled``, the others do nothing. Scalars are written as
``<prefix>/<name>`` (``train/loss``, ``val/loss``) at the given step.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from tqdm import tqdm

from aligner.config import LoggingConfig


class MetricsLogger:
    """Progress bar (step, loss, tokens/s, ETA), TensorBoard scalars and wandb, as configured.

    Args:
        config: the logging section.
        total_steps: the run's length, for the progress bar's ETA.
        initial_step: steps already done (a resumed run).
        enabled: False makes every method a no-op (non-logging ranks).
        run_config: the run's configuration, recorded in wandb.

    Raises:
        ImportError: wandb is enabled (``wandb_project`` set, mode not
            ``disabled``) but not installed.
    """

    def __init__(
        self,
        config: LoggingConfig,
        *,
        total_steps: int,
        initial_step: int = 0,
        enabled: bool = True,
        run_config: Any = None,
    ) -> None:
        self.enabled = enabled
        self._bar = None
        self._tensorboard = None
        self._wandb_run = None
        if not enabled:
            return
        if config.progress_bar:
            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)
        if config.tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=config.tensorboard_dir)
        if config.wandb_project is not None and config.wandb_mode != "disabled":
            self._wandb_run = _start_wandb(config, run_config)

    def advance(self, steps: int = 1) -> None:
        """Move the progress bar by ``steps`` optimizer steps."""
        if self._bar is not None:
            self._bar.update(steps)

    def log(self, step: int, metrics: dict[str, float], prefix: str) -> None:
        """Write ``metrics`` at ``step`` under ``prefix`` (``train`` metrics also go on the progress bar)."""
        if not self.enabled:
            return
        if self._bar is not None and prefix == "train":
            shown = {"loss": f"{metrics['loss']:.4g}"} if "loss" in metrics else {}
            if "tokens_per_s" in metrics:
                shown["tok/s"] = f"{metrics['tokens_per_s']:.3g}"
            self._bar.set_postfix(shown, refresh=False)
        if self._bar is not None and prefix != "train":
            self._bar.write(f"step {step} {prefix}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if self._tensorboard is not None:
            for name, value in metrics.items():
                self._tensorboard.add_scalar(f"{prefix}/{name}", value, step)
        if self._wandb_run is not None:
            self._wandb_run.log({f"{prefix}/{name}": value for name, value in metrics.items()}, step=step)

    def close(self) -> None:
        """Flush and close every sink."""
        if self._bar is not None:
            self._bar.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()


def _start_wandb(config: LoggingConfig, run_config: Any) -> Any:
    try:
        import wandb
    except ImportError:
        raise ImportError(
            f"logging.wandb_project is {config.wandb_project!r} but wandb is not installed; "
            "pip install wandb, or set logging.wandb_project=null (or logging.wandb_mode=disabled)"
        ) from None
    if config.wandb_dir is not None:
        os.makedirs(config.wandb_dir, exist_ok=True)
    if dataclasses.is_dataclass(run_config):
        run_config = dataclasses.asdict(run_config)
    return wandb.init(
        project=config.wandb_project,
        name=config.run_name,
        mode=config.wandb_mode,
        dir=config.wandb_dir,
        config=run_config,
    )
