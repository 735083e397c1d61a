"""Masks, DDSR update order, no future leakage for every variant, GCA, sampled softmax."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.recall.data import make_batch
from model.recall.model import VARIANTS, DomainState, RecallConfig, RecallModel, attention_mask, sampled_softmax_loss
from model.recall.train import negatives_for_batch
from tests.recall.conftest import toy_sequence


def test_attention_masks() -> None:
    doms = torch.tensor([[0, 1, 0, 1, 0]])
    valid = torch.tensor([[True, True, True, True, False]])
    full, intra = attention_mask(doms, valid, intra=False), attention_mask(doms, valid, intra=True)
    assert full.shape == intra.shape == (1, 5, 5)
    assert full[0, 3].tolist() == [True, True, True, True, False]
    assert intra[0, 3].tolist() == [False, True, False, True, False]  # own domain, earlier or itself
    assert intra[0, 2].tolist() == [True, False, True, False, False]
    assert not full[0].triu(1).any() and not intra[0].triu(1).any()  # nothing from the future
    assert full[0, 4, 4] and intra[0, 4, 4]  # a padded row reads itself (no empty softmax)


def _state(h: torch.Tensor, doms: list[int], ts: list[int]) -> torch.Tensor:
    cell = DomainState(h.shape[-1]).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in cell.parameters():
            p.normal_()
        return cell(h, torch.tensor([doms]), torch.tensor([ts]), torch.ones(1, len(doms), dtype=torch.bool))


def test_ddsr_state_update_order() -> None:
    torch.manual_seed(1)
    h = torch.randn(1, 4, 8)
    s = _state(h, [0, 1, 0, 0], [1, 2, 3, 4])  # (1, T, 2, d)
    # a domain's state changes only at that domain's items
    assert torch.equal(s[0, 1, 0], s[0, 0, 0]) and not torch.equal(s[0, 1, 1], s[0, 0, 1])
    assert torch.equal(s[0, 3, 1], s[0, 1, 1]) and not torch.equal(s[0, 3, 0], s[0, 2, 0])
    # on different days the order matters (a recurrence) ...
    swapped = _state(h[:, [0, 1, 3, 2]], [0, 1, 0, 0], [1, 2, 3, 4])
    assert not torch.allclose(swapped[0, 3], s[0, 3])
    # ... within a day it does not: the day's items update the state as a set
    same_day = _state(h, [0, 1, 0, 0], [1, 2, 3, 3])
    same_day_swapped = _state(h[:, [0, 1, 3, 2]], [0, 1, 0, 0], [1, 2, 3, 3])
    assert torch.allclose(same_day[0, 3], same_day_swapped[0, 3], atol=1e-6)
    # the first same-day item sees only itself, not the item after it
    assert torch.allclose(same_day[0, 2], s[0, 2], atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_future_leakage(variant: str, toy_catalog) -> None:
    """Changing item t+1 (even its domain) leaves every prediction at positions <= t unchanged."""
    torch.manual_seed(0)
    model = RecallModel(RecallConfig(n_items=toy_catalog.n_items, variant=variant, d=16, n_layers=2, n_heads=2,
                                     gca_layers=(0, 1))).eval()
    items, ts = [1, 21, 2, 3, 22, 4, 23, 5], [1, 1, 2, 3, 3, 4, 5, 6]
    t = 3
    base = make_batch([toy_sequence(toy_catalog, items, ts)], max_len=50, cut=0)
    for new in (6, 30):  # same domain, other domain
        changed = items.copy()
        changed[t + 1] = new
        b = make_batch([toy_sequence(toy_catalog, changed, ts)], max_len=50, cut=0)
        # the targets of positions <= t describe the item being predicted, not the input: keep them
        b.target_doms[:, :t + 1], b.query_trans[:, :t + 1] = base.target_doms[:, :t + 1], base.query_trans[:, :t + 1]
        with torch.no_grad():
            q0, q1 = model.queries(base), model.queries(b)
        assert torch.allclose(q0[:, :t + 1], q1[:, :t + 1], atol=1e-6), variant
        assert not torch.allclose(q0[:, t + 1:], q1[:, t + 1:], atol=1e-6)  # the test can see a change


def test_intra_variant_has_no_cross_domain_path(toy_catalog) -> None:
    """intra: a query for domain a ignores every item of domain b; hstu does not."""
    items, ts = [1, 21, 2, 22, 3], [1, 2, 3, 4, 5]
    other = [1, 25, 2, 29, 3]  # only domain-b items differ
    for variant, same in (("intra", True), ("hstu", False)):
        torch.manual_seed(0)
        model = RecallModel(RecallConfig(n_items=40, variant=variant, d=16, n_layers=2, n_heads=2)).eval()
        with torch.no_grad():
            q = [model.queries(make_batch([toy_sequence(toy_catalog, i, ts)], 50, cut=0),
                               torch.zeros(1, 4, dtype=torch.long)) for i in (items, other)]
        assert torch.allclose(q[0][0, -1], q[1][0, -1], atol=1e-6) is same, variant


def test_gca_logs_orthogonality(toy_catalog) -> None:
    model = RecallModel(RecallConfig(n_items=40, variant="gca", d=16, n_layers=2, n_heads=2, gca_layers=(1,),
                                     gca_act="tanh", gca_ln=False))
    model.queries(make_batch([toy_sequence(toy_catalog, [1, 21, 2, 22, 3], [1, 2, 3, 4, 5])], 50, cut=0))
    cos = model.gca_cos()
    assert set(cos) == {"block1", "readout"} and all(0 <= v <= 1 for v in cos.values())
    with pytest.raises(ValueError, match="gca_layers"):
        RecallConfig(n_items=40, variant="gca", n_layers=2, gca_layers=(2,))


def test_sampled_softmax_matches_hand_computation(toy_catalog) -> None:
    torch.manual_seed(0)
    model = RecallModel(RecallConfig(n_items=40, variant="hstu", d=8, n_heads=1, tau=0.5))
    q = torch.randn(2, 8)
    targets, tdoms = torch.tensor([3, 25]), torch.tensor([0, 1])
    negs = torch.tensor([[3, 7, 9], [21, 22, 23]])  # row 0 holds the first target: an accidental hit
    with torch.no_grad():
        loss = sampled_softmax_loss(model, q, targets, tdoms, negs)
        cos = lambda a, i: float(F.cosine_similarity(a, model.item.weight[i], dim=0)) / 0.5  # noqa: E731
        l0 = -cos(q[0], 3) + math.log(sum(math.exp(cos(q[0], i)) for i in (3, 7, 9)))  # the hit 3 counted once
        l1 = -cos(q[1], 25) + math.log(sum(math.exp(cos(q[1], i)) for i in (25, 21, 22, 23)))
        assert float(loss) == pytest.approx((l0 + l1) / 2, rel=1e-5)


def test_negatives_come_from_each_domain(toy_catalog) -> None:
    negs = negatives_for_batch(toy_catalog, 50, torch.Generator().manual_seed(0))
    assert negs.shape == (2, 50)
    assert negs[0].min() >= 1 and negs[0].max() <= 20 and negs[1].min() >= 21 and negs[1].max() <= 40
