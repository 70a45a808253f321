from tests.helpers.ddp import run_ddp_script


def test_two_process_cpu_ddp_job_trains_in_sync(tmp_path):
    results = run_ddp_script(
        """
        import torch
        from lightning.pytorch import Trainer, seed_everything
        from tests.helpers.ddp import write_result
        from tests.helpers.models import TinyClassifier, classification_loader

        seed_everything(0)
        model = TinyClassifier()
        trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(model, classification_loader())
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        write_result({"world_size": trainer.world_size, "rank": trainer.global_rank,
                      "weights": flat.tolist(), "step": trainer.global_step}, trainer.global_rank)
        """,
        tmp_path,
    )
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world_size"] == 2 and r["step"] == 3 for r in results)
    assert results[0]["weights"] == results[1]["weights"]  # DDP kept the replicas identical
