"""Test-only CPU harness for Lightning's ``DeepSpeedStrategy``: real DeepSpeed ZeRO-1/2/3 engines on gloo.

Lightning's ``DeepSpeedStrategy`` refuses CPU in three places; DeepSpeed itself runs there (its CPU accelerator,
``DS_ACCELERATOR=cpu``, falls back to gloo without IPEX or oneCCL). :class:`CPUDeepSpeedStrategy` overrides exactly
those three methods and nothing else, so every other line that runs is Lightning's and DeepSpeed's own code:
the ZeRO optimizer and its flat partitions, the engine's backward and step, ``engine.save_checkpoint`` /
``load_checkpoint``. Users on GPUs get Lightning's own ``DeepSpeedStrategy``: this class is never shipped
(it lives under ``tests/``), and only the fit path is covered (Lightning's inference path,
``_initialize_deepspeed_inference``, would need a fourth override).

``DS_ACCELERATOR`` must be set before DeepSpeed is first imported (it picks its accelerator once, at import):
importing this module sets it, so import it before anything that imports ``deepspeed``. Under
:func:`tests.helpers.ddp.run_ddp_script` every rank re-executes the script, so the import order holds on every rank.

Example::

    from tests.helpers.deepspeed import CPUDeepSpeedStrategy, zero  # first: sets DS_ACCELERATOR=cpu
    trainer = Trainer(accelerator="cpu", devices=2, strategy=CPUDeepSpeedStrategy(stage=2), max_steps=4)
    trainer = Trainer(accelerator="cpu", devices=2, strategy=zero(3), max_steps=4)  # tiny parameters partitioned too
"""

from __future__ import annotations

import argparse
import os
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before any `import deepspeed`: its accelerator is chosen at import

from lightning.fabric.utilities.seed import reset_seed  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy  # noqa: E402
from torch.nn import Module  # noqa: E402
from torch.optim import Optimizer  # noqa: E402
from typing_extensions import override  # noqa: E402

__all__ = ["CPUDeepSpeedStrategy", "zero"]


def zero(stage: int, **kwargs: Any) -> CPUDeepSpeedStrategy:
    """``CPUDeepSpeedStrategy(stage=stage)`` with Lightning's default config, every parameter partitioned at ZeRO-3.

    DeepSpeed keeps ZeRO-3 parameters below ``stage3_param_persistence_threshold`` (100K entries) whole on every
    rank; test models are that small, so the threshold is set to 0 to partition them as a large model's would be.
    """
    strategy = CPUDeepSpeedStrategy(stage=stage, **kwargs)
    if stage == 3:
        strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return strategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` (same arguments, same default config) with its three CPU refusals removed.

    Tests only: see the module docs.
    """

    @override
    def setup_environment(self) -> None:
        # DeepSpeedStrategy.setup_environment raises "only supported on CUDA GPUs" for any other accelerator, then
        # calls DDPStrategy's. Call DDPStrategy's directly: the accelerator's device set-up, then setup_distributed.
        DDPStrategy.setup_environment(self)

    @override
    def setup_distributed(self) -> None:
        # DeepSpeedStrategy.setup_distributed first checks that the device indices are 0..n-1 (one GPU per local
        # rank); CPU devices have no index ([None, None]), so that check always fails. The rest is unchanged:
        # reset the seed, set the world ranks, start DeepSpeed's process group (gloo, Lightning's choice for CPU).
        reset_seed()
        self.set_world_ranks()
        _skip_shared_memory_all_reduce()
        self._init_deepspeed_distributed()

    @override
    def _setup_model_and_optimizer(
        self, model: Module, optimizer: Optimizer | None, lr_scheduler: Any = None
    ) -> tuple[Any, Optimizer]:
        # DeepSpeedStrategy passes `device_rank=self.root_device.index`, None on CPU, and DeepSpeed's engine then
        # compares `None >= 0` (TypeError). Pass the local rank instead: DeepSpeed's CPU accelerator maps any
        # device rank to the "cpu" device, and a rank >= 0 makes the engine read world size and rank from the
        # process group (a negative one would make it a 1-process engine). Otherwise Lightning's call, verbatim.
        import deepspeed

        model_parameters = filter(lambda p: p.requires_grad, model.parameters())
        deepspeed_engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=model_parameters,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return deepspeed_engine, deepspeed_optimizer


def _skip_shared_memory_all_reduce() -> None:
    """Keep DeepSpeed's comm backend from compiling its shared-memory all-reduce, which training never uses.

    On CPU, starting the backend probes every op's compiler and then JIT-compiles ``deepspeed_shm_comm``, a C++
    extension: 45 s in a fresh environment (measured here: the llama-tiny job took 73.5 s with an empty
    ``~/.cache/torch_extensions``, 28 s with it built), and CI starts from a fresh one every run. Only
    ``inference_all_reduce`` calls it; ZeRO's reductions go through ``torch.distributed`` (gloo) either way. The
    flag below is the only thing DeepSpeed reads ``__compatible_ops__`` for (``deepspeed.comm.torch.build_shm_op``).
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
