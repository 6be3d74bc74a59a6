"""Serving pieces that need no server: resizing across a swap, top-k."""

import torch

from app.serving import resize_to, top_predictions


def test_requests_prepared_before_a_swap_are_resized_to_the_new_input_size():
    old, new = torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    batch = torch.cat([resize_to(old, 16), resize_to(new, 16)])
    assert batch.shape == (3, 3, 16, 16) and batch.dtype == torch.uint8


def test_top_k_is_capped_by_the_number_of_classes_and_ordered():
    probs = torch.tensor([[0.1, 0.7, 0.2]])
    [p] = top_predictions(probs, ["a", "b", "c"], k=5)
    assert p.label == "b" and [label for label, _ in p.top_k] == ["b", "c", "a"]
