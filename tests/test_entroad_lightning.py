"""EntroAD through ZSADModule and Lightning: both stages fit, then a test-only module runs from the checkpoint."""

from __future__ import annotations

import torch
from test_entroad import SIZE, TINY, _batch, _write_samples

from data_modules.datamodule import ZSADDataModule
from data_modules.dataset import ZSADDataset, collate
from zsad.config import EXPERIMENTS, compose


def test_lightning_stages_and_test_only_run_from_checkpoint(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader

    from zsad.module import ZSADModule

    data = {
        "train": _write_samples(tmp_path, "aux", 6, 0),
        "target": _write_samples(tmp_path, "target", 3, 1),
    }
    train = data["train"]
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

    class AuxData(ZSADDataModule):
        """The DataModule with the auxiliary samples given (no reader): the memory is built from its batches."""

        def __init__(self) -> None:
            super().__init__(None, [], SIZE, mean, std, batch_size=3, num_workers=0)
            self.train_samples = train

        def train_dataloader(self):
            return DataLoader(ZSADDataset(train, SIZE, mean, std), batch_size=3, collate_fn=collate)

    overrides = [f"method.{k}={v}" for k, v in TINY.items() if k != "clip"]
    overrides += ["method.clip.name=tiny", "method.clip.pretrained=none"]
    cfg = compose([EXPERIMENTS / "methods" / "entroad.yaml"], [o.replace(" ", "") for o in overrides])
    torch.manual_seed(0)  # random frozen weights: the same in both modules, as pretrained ones would be
    module = ZSADModule(cfg, cache_dir=tmp_path / "cache")
    for stage in module.model.stages():
        module.set_stage(stage.name)
        trainer = L.Trainer(
            accelerator="cpu",
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, datamodule=AuxData())
        trainer.save_checkpoint(tmp_path / f"{stage.name}.ckpt")
    torch.manual_seed(0)
    tested = ZSADModule(cfg, cache_dir=tmp_path / "elsewhere")
    ckpt = tested.load_trainable(tmp_path / "prompt.ckpt")
    tested.set_stage(ckpt["zsad"]["stage"])
    batch = _batch(data["target"])
    module.eval(), tested.eval()
    with torch.no_grad():
        a, b = module(batch.image, batch), tested(batch.image, batch)
    assert torch.allclose(a.anomaly_map, b.anomaly_map) and torch.allclose(a.image_score, b.image_score)
    assert not (tmp_path / "elsewhere").exists()  # the memory came with the checkpoint
