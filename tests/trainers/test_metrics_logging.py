"""MetricsLogger: TensorBoard scalars, a wandb offline run directory, and a clear error without wandb."""

import sys

import pytest

from aligner.config import LoggingConfig
from aligner.trainers.logging import MetricsLogger

STEPS = [{"loss": 2.5, "tokens_per_s": 100.0}, {"loss": 2.0, "tokens_per_s": 120.0}]


def _log_two_steps(logger: MetricsLogger) -> None:
    for step, metrics in enumerate(STEPS, start=1):
        logger.log(step, metrics, "train")
        logger.advance()
    logger.log(2, {"loss": 2.25}, "val")
    logger.close()


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log_two_steps(MetricsLogger(LoggingConfig(tensorboard_dir=str(tmp_path / "tb")), total_steps=2))
    (event_file,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["train/loss", "train/tokens_per_s", "val/loss"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.5), (2, 2.0)]
    assert [(e.step, e.value) for e in events.Scalars("val/loss")] == [(2, 2.25)]


def test_disabled_logger_writes_nothing(tmp_path):
    config = LoggingConfig(tensorboard_dir=str(tmp_path / "tb"), wandb_project="p", wandb_dir=str(tmp_path / "wb"))
    _log_two_steps(MetricsLogger(config, total_steps=2, enabled=False))
    assert list(tmp_path.iterdir()) == []


def test_wandb_offline_writes_a_local_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = LoggingConfig(wandb_project="aligner-test", wandb_mode="offline", wandb_dir=str(tmp_path), run_name="t")
    _log_two_steps(MetricsLogger(config, total_steps=2, run_config=config))
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("run-*.wandb"))


def test_wandb_enabled_but_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    config = LoggingConfig(wandb_project="p", progress_bar=False)
    with pytest.raises(ImportError, match="wandb is not installed.*wandb_project"):
        MetricsLogger(config, total_steps=1)
