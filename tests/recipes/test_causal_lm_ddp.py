from tests.helpers.ddp import run_ddp_script


def test_causal_lm_with_plot_and_sample_callbacks_on_two_process_ddp(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"f{i}.txt").write_text("def add(a, b):\n    return a + b\n" * 100)
    r0, r1 = run_ddp_script(
        f"""
        import torch
        from lightning.pytorch import Trainer, seed_everything
        from lightning.pytorch.loggers import CSVLogger
        from lightning_gd.callbacks import MetricPlotter, TextSampler
        from lightning_gd.recipes import CausalLMModule, TextCorpusDataModule
        from tests.helpers.ddp import write_result

        seed_everything(0)
        dm = TextCorpusDataModule(data_dir={str(corpus)!r}, seq_len=16, batch_size=4, train_windows=64)
        model = CausalLMModule(overrides={{"block_size": 16, "n_layer": 1}})
        sampler = TextSampler(prompt="def", max_new_tokens=8)
        trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, val_check_interval=2,
                          limit_val_batches=1, logger=CSVLogger("logs"), enable_progress_bar=False,
                          enable_model_summary=False, callbacks=[MetricPlotter(every_n_steps=1), sampler])
        trainer.fit(model, datamodule=dm)
        write_result({{"sample": sampler.last_sample, "log_dir": trainer.log_dir,
                       "weights": torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()}},
                     trainer.global_rank)
        """,
        tmp_path,
        launcher="external",
    )
    assert r0["weights"] == r1["weights"]
    assert r0["sample"].startswith("def") and r1["sample"] is None  # rank zero samples and writes
    run = tmp_path / r0["log_dir"]
    assert (run / "loss_curves.png").is_file() and (run / "sample.txt").read_text() == r0["sample"]
