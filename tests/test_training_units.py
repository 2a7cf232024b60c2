"""Unit tests of three recipe-critical pieces: the official learning-rate split, class-head
re-initialisation when starting from pretrained weights, the resumable distributed sampler; and the
training step with non-finite predictions."""

from __future__ import annotations

import logging

import pytest
import torch

from ddetr.data.samplers import ResumableDistributedSampler
from ddetr.checkpoints import load_pretrained, save_checkpoint
from ddetr.training.module import DeformableDETRModule


def test_configure_optimizers_uses_the_official_lr_split(micro_module):
    config = micro_module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.AdamW)
    names = {id(p): n for n, p in micro_module.model.named_parameters()}
    # official recipe: lr 2e-4, backbone 2e-5, sampling offsets and reference points 2e-4 * 0.1, decay 1e-4
    expected_lr = {"backbone": 2e-5, "linear_proj": 2e-5, "rest": 2e-4}
    seen = set()
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(expected_lr[group["name"]])
        assert group["weight_decay"] == pytest.approx(1e-4)
        for param in group["params"]:
            name = names[id(param)]
            seen.add(name)
            if group["name"] == "backbone":
                assert name.startswith("backbone.")
            elif group["name"] == "linear_proj":
                assert ".sampling_offsets." in name or name.startswith("transformer.reference_points.")
            else:
                assert not name.startswith("backbone.") and "sampling_offsets" not in name, name
    trainable = {n for n, p in micro_module.model.named_parameters() if p.requires_grad}
    assert seen == trainable  # every trainable parameter in exactly one group
    assert {g["name"] for g in optimizer.param_groups} == {"backbone", "linear_proj", "rest"}
    # StepLR: x0.1 at epoch 40
    assert (scheduler.step_size, scheduler.gamma) == (40, pytest.approx(0.1))


def test_load_pretrained_reinitialises_only_the_class_heads(tmp_path, micro_config, caplog):
    torch.manual_seed(1)
    source = DeformableDETRModule(micro_config)  # 5 classes
    path = tmp_path / "source.ckpt"
    save_checkpoint(source, path, "test")
    torch.manual_seed(2)
    target = DeformableDETRModule(micro_config, num_classes=3)
    fresh_heads = {k: v.clone() for k, v in target.model.state_dict().items() if k.startswith("class_embed")}
    with caplog.at_level(logging.WARNING):
        load_pretrained(target.model, str(path))
    assert "re-initialised the class heads" in caplog.text
    source_state = source.model.state_dict()
    for key, value in target.model.state_dict().items():
        if key.startswith("class_embed"):
            assert torch.equal(value, fresh_heads[key]), key  # kept at its fresh initialisation
        else:
            assert torch.equal(value, source_state[key]), key  # everything else from the checkpoint
    other = DeformableDETRModule(micro_config, hidden_dim=64)  # a non-head shape mismatch is an error
    with pytest.raises(ValueError, match="has shape"):
        load_pretrained(other.model, str(path))


class _Ten(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, index):
        return index


def _iterate(epoch: int, rank: int, seed: int = 3) -> list[tuple[int, int]]:
    sampler = ResumableDistributedSampler(_Ten(), num_replicas=3, rank=rank, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_resumable_sampler_shards_pads_seeds_and_resumes():
    ranks = [_iterate(epoch=0, rank=r) for r in range(3)]
    # 10 samples on 3 ranks: padded to 12, 4 each, every sample at least once, 2 repeated
    assert [len(r) for r in ranks] == [4, 4, 4]
    indices = [i for r in ranks for i, _ in r]
    assert sorted(set(indices)) == list(range(10)) and len(indices) == 12
    # the augmentation seed depends only on (seed, epoch, index): equal wherever the index is drawn
    seeds = {}
    for index, seed in (pair for r in ranks for pair in r):
        assert seeds.setdefault(index, seed) == seed
    assert _iterate(epoch=0, rank=1) == ranks[1]  # deterministic
    assert [i for i, _ in _iterate(epoch=1, rank=1)] != [i for i, _ in ranks[1]] or _iterate(1, 0) != ranks[0]
    # resuming epoch 0 after 3 consumed samples yields the rest of the same order, once
    sampler = ResumableDistributedSampler(_Ten(), num_replicas=3, rank=1, seed=3)
    sampler.set_epoch(0)
    sampler.resume(epoch=0, consumed=3)
    assert list(sampler) == ranks[1][3:]
    assert list(sampler) == ranks[1]  # the next iteration starts from the beginning again
    # a resume point of another epoch is ignored
    sampler.resume(epoch=5, consumed=3)
    assert list(sampler) == ranks[1]


def test_nonfinite_predictions_still_reach_the_collective_of_the_criterion(micro_module, monkeypatch):
    """A rank whose predictions are NaN must still enter the criterion, whose num_boxes all_reduce the other
    ranks enter too (skipping it would leave them waiting); the step then stops naming the predictions."""
    import lightning as L

    from ddetr.models import criterion as criterion_module
    from ddetr.training.module import NonFiniteLossError

    calls = []
    average_num_boxes = criterion_module.average_num_boxes
    spy = lambda *args, **kwargs: calls.append(kwargs) or average_num_boxes(*args, **kwargs)  # noqa: E731
    monkeypatch.setattr(criterion_module, "average_num_boxes", spy)
    micro_module.train()
    micro_module.trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    images = torch.full((2, 3, 64, 96), float("nan"))
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}] * 2
    bad_terms = r"non-finite terms on this rank: \['pred_boxes', 'pred_logits'\]"
    with pytest.raises(NonFiniteLossError, match=rf"global step 0 .*{bad_terms}"):
        micro_module.training_step((images, mask, targets), 0)
    assert calls == [{"sync": True}]  # entered once, with the synchronisation on
