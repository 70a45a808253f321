"""Every private name of Lightning, torch, torchdata and litdata that lightning_gd relies on exists upstream.

Each function of ``lightning_gd._compat`` runs here against the installed versions: an upgrade that renames one
of these names fails its test here (and :class:`~lightning_gd._compat.UpstreamChanged` at run time).
"""

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState
from torch.utils.data import DistributedSampler, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_gd import _compat
from lightning_gd.strategies import CompressedDDPStrategy


def test_a_missing_private_name_stops_the_run_naming_it():
    with pytest.raises(_compat.UpstreamChanged, match=r"Lightning's DDPStrategy's private `_ddp_kwargs`.*renamed"):
        _compat.ddp_kwargs(object())
    with pytest.raises(_compat.UpstreamChanged, match=r"\['_sampler_iter_state'\]\['samples_yielded'\]"):
        _compat.torchdata_samples_read({"_sampler_iter_state": {}})
    with pytest.raises(_compat.UpstreamChanged, match="current_epoch"):
        _compat.litdata_loader_epoch({})


def test_ddp_kwargs_is_the_live_dict_ddp_is_built_with():
    strategy = DDPStrategy(bucket_cap_mb=3)
    kwargs = _compat.ddp_kwargs(strategy)
    assert kwargs["bucket_cap_mb"] == 3
    kwargs["bucket_cap_mb"] = 5  # CompressedDDPStrategy widens the bucket this way
    assert _compat.ddp_kwargs(strategy)["bucket_cap_mb"] == 5


def test_ddp_comm_state_and_model_averager():
    state = PostLocalSGDState(process_group=None, subgroup=None, start_localSGD_iter=3)
    strategy = DDPStrategy(ddp_comm_state=state)
    assert _compat.ddp_comm_state(strategy) is state
    assert _compat.model_averager(strategy) is None  # set by Lightning at setup with model_averaging_period
    single = SingleDeviceStrategy("cpu")
    assert _compat.ddp_comm_state(single) is None and _compat.model_averager(single) is None


def test_layer_sync_says_whether_sync_batchnorm_is_on():
    on = Trainer(accelerator="cpu", devices=1, strategy=DDPStrategy(), sync_batchnorm=True, logger=False)
    off = Trainer(accelerator="cpu", devices=1, strategy=DDPStrategy(), logger=False)
    assert _compat.layer_sync(on.strategy) is not None and _compat.layer_sync(off.strategy) is None


def test_the_ddp_hook_method_compressed_ddp_overrides_exists():
    assert callable(getattr(DDPStrategy, _compat.DDP_HOOK_METHOD))
    assert _compat.DDP_HOOK_METHOD in vars(CompressedDDPStrategy)


@pytest.mark.parametrize(("rows", "cols", "rank", "rate"), [(64, 64, 1, 2.0), (4, 3, 2, 2.0), (100, 1, 1, 2.0)])
def test_powersgd_should_compress_is_torchs_test(rows, cols, rank, rate):
    # Vogels et al. 2019 / torch's hook: compress when (n + m) r * rate < n m.
    assert _compat.powersgd_should_compress(rows, cols, rank, rate) == ((rows + cols) * rank * rate < rows * cols)


@pytest.mark.parametrize("workers", [0, 2])
def test_torchdata_samples_read_of_a_plain_sampler(workers):
    data = TensorDataset(torch.arange(20))
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True)
    loader = StatefulDataLoader(data, batch_size=2, sampler=sampler, num_workers=workers)
    it = iter(loader)
    for _ in range(3):
        next(it)
    assert _compat.torchdata_samples_read(loader.state_dict()) == 6


def test_set_csv_header_lets_the_writer_append_under_an_existing_header(tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="run", version=0)
    experiment = logger.experiment  # the writer
    path = tmp_path / "run" / "version_0" / "metrics.csv"
    path.write_text("a,step\n1.0,0\n")  # a kept earlier row, with a column the next rows lack
    _compat.set_csv_header(experiment, ["a", "step"])
    logger.log_metrics({"b": 2.0}, step=1)
    logger.save()
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["a"], r["b"], r["step"]) for r in rows] == [("1.0", "", "0"), ("", "2.0", "1")]


def test_log_step_metrics_sends_the_steps_values_to_the_loggers(tmp_path):
    import csv

    from lightning.pytorch import Callback
    from lightning.pytorch.loggers import CSVLogger

    from tests.helpers.models import TinyClassifier, classification_loader

    class Stop(Callback):
        def on_train_batch_end(self, trainer, *args):
            _compat.log_step_metrics(trainer)  # the values Lightning logs right after this hook
            raise KeyboardInterrupt  # never reach Lightning's own logging of the step

    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer = Trainer(max_steps=1, logger=logger, callbacks=[Stop()], log_every_n_steps=1, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    with pytest.raises(SystemExit):
        trainer.fit(TinyClassifier(), classification_loader())
    with open(tmp_path / "run" / "version_0" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["step"] for row in rows if row.get("train/loss")] == ["0"], rows
