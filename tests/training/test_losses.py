import torch

from napari_segtool.training import dice_ce_loss


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Conv2d(1, 3, 3, padding=1)
    x = torch.randn(2, 1, 12, 12, generator=g)
    target = torch.randint(0, 3, (2, 12, 12), generator=g)
    valid = torch.rand(2, 12, 12, generator=g) > 0.5
    return net, x, target, valid


def _grads(net, x, target, valid):
    net.zero_grad()
    loss = dice_ce_loss(net(x), target, valid=valid)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in net.parameters()]


def test_unlabelled_voxels_change_no_gradient():
    net, x, target, valid = _setup()
    loss_a, grads_a = _grads(net, x, target, valid)
    scrambled = target.clone()
    scrambled[~valid] = (target[~valid] + 1) % 3  # other labels where nothing counts
    loss_b, grads_b = _grads(net, x, scrambled, valid)
    assert loss_a == loss_b
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.equal(a, b)
    # and labels that do count change it
    flipped = target.clone()
    flipped[valid] = (target[valid] + 1) % 3
    loss_c, _ = _grads(net, x, flipped, valid)
    assert loss_c != loss_a


def test_logit_gradient_is_zero_outside_the_mask():
    _, _, target, valid = _setup(1)
    logits = torch.randn(2, 3, 12, 12, requires_grad=True)
    dice_ce_loss(logits, target, valid=valid).backward()
    outside = logits.grad.movedim(1, -1)[~valid]
    inside = logits.grad.movedim(1, -1)[valid]
    assert torch.count_nonzero(outside) == 0
    assert torch.count_nonzero(inside) > 0


def test_no_valid_voxel_gives_zero_loss_and_gradient():
    logits = torch.randn(1, 2, 4, 4, requires_grad=True)
    loss = dice_ce_loss(logits, torch.ones(1, 4, 4, dtype=torch.long),
                        valid=torch.zeros(1, 4, 4, dtype=torch.bool))  # fmt: skip
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.count_nonzero(logits.grad) == 0


def test_perfect_prediction_has_lower_loss_than_wrong_one():
    target = torch.randint(0, 2, (1, 8, 8))
    good = torch.nn.functional.one_hot(target, 2).movedim(-1, 1).float() * 20 - 10
    assert dice_ce_loss(good, target) < 0.01
    assert dice_ce_loss(-good, target) > 0.9
