import torch

from paro_kernels.orders import candidate_orders, head_permutations, inverse_permutation, order_permutation

from conftest import position_in_order


def test_candidates_are_all_axis_orders():
    assert sorted(candidate_orders((4, 3, 5))) == ["FHW", "FWH", "HFW", "HWF", "WFH", "WHF"]
    assert candidate_orders((4, 3, 5))[0] == "FHW"
    assert candidate_orders((1, 3, 5)) == ["HW", "WH"]


def test_permutation_matches_stride_formula():
    grid = (3, 4, 5)
    for order in candidate_orders(grid):
        perm = order_permutation(order, grid)
        for f in range(3):
            for h in range(4):
                for w in range(5):
                    arrival = f * 20 + h * 5 + w
                    assert perm[position_in_order(order, grid, f, h, w)] == arrival


def test_image_orders():
    grid = (1, 3, 4)
    assert order_permutation("HW", grid).tolist() == list(range(12))
    wh = order_permutation("WH", grid)
    assert wh[:3].tolist() == [0, 4, 8]  # column 0 first


def test_inverse_and_head_stack():
    grid = (2, 3, 4)
    perms = head_permutations(["HWF", "FHW", "WFH"], grid)
    assert perms.shape == (3, 24)
    x = torch.randn(3, 24)
    back = x.gather(1, perms).gather(1, inverse_permutation(perms))
    assert torch.equal(back, x)
    assert perms[1].tolist() == list(range(24))
