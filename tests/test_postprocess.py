"""PostProcess: top-k over queries x classes and box scaling, checked by hand."""

import math

import pytest
import torch

from ddetr.models.postprocess import PostProcess


def sigmoid(value: float) -> float:
    return 1 / (1 + math.exp(-value))


def hand_built_outputs():
    # (query, class) logits sorted: (1,0)=5, (0,1)=3, (2,1)=2, (2,0)=1, (0,0)=0, (1,1)=-1
    logits = torch.tensor([[[0.0, 3.0], [5.0, -1.0], [1.0, 2.0]]])
    boxes = torch.tensor([[[0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 0.2, 0.4], [0.75, 0.5, 0.1, 1.0]]])
    return {"pred_logits": logits, "pred_boxes": boxes}


def test_top_k_and_scaling_by_hand():
    (result,) = PostProcess(num_select=3)(hand_built_outputs(), torch.tensor([[100, 200]]))  # h=100, w=200
    torch.testing.assert_close(result["scores"], torch.tensor([sigmoid(5), sigmoid(3), sigmoid(2)]))
    assert result["labels"].dtype == torch.int64
    assert result["labels"].tolist() == [0, 1, 1]
    # queries 1, 0, 2 -> xyxy (0.4,0.3,0.6,0.7), (0,0,0.5,0.5), (0.7,0,0.8,1) scaled by (w, h, w, h)
    expected_boxes = torch.tensor([[80.0, 30.0, 120.0, 70.0], [0.0, 0.0, 100.0, 50.0], [140.0, 0.0, 160.0, 100.0]])
    torch.testing.assert_close(result["boxes"], expected_boxes)


def test_num_select_larger_than_candidates_keeps_all_sorted():
    (result,) = PostProcess(num_select=100)(hand_built_outputs(), torch.tensor([[1, 1]]))
    expected_logits = [5.0, 3.0, 2.0, 1.0, 0.0, -1.0]
    torch.testing.assert_close(result["scores"], torch.tensor([sigmoid(v) for v in expected_logits]))
    assert result["labels"].tolist() == [0, 1, 1, 0, 0, 1]


def test_each_image_uses_its_own_size():
    outputs = hand_built_outputs()
    batch = {key: torch.cat([value, value]) for key, value in outputs.items()}
    first, second = PostProcess(num_select=1)(batch, torch.tensor([[100, 200], [10, 20]]))
    torch.testing.assert_close(first["boxes"], torch.tensor([[80.0, 30.0, 120.0, 70.0]]))
    torch.testing.assert_close(second["boxes"], torch.tensor([[8.0, 3.0, 12.0, 7.0]]))


def test_bad_target_sizes_raise():
    with pytest.raises(ValueError, match=r"\(h, w\)"):
        PostProcess(num_select=100)(hand_built_outputs(), torch.tensor([100, 200]))
