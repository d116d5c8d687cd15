"""The objectives layer: which passes each method runs, losses read at the right rows and positions, and the
edge cases (unknown names, tau < 0, nothing masked). Logits are given directly (single process, group=None),
and every expected value is written out in float64 here."""

import pytest
import torch

from mdu_dist.data import Pairs
from mdu_dist.methods import METHODS, MethodConfig, VocabShard, build_objective, microbatch_loss, prepare

V, MASK = 11, 3


def _pairs(seq=6):
    ids = torch.tensor([[5, 6, 7, 8, 9, 2], [5, 7, 8, 9, 10, 4]])
    response = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    return Pairs(ids, response)


def _batch():
    return {"forget": _pairs(), "retain": _pairs(), "idk": _pairs()}


def _full_logits(mb, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(mb.ids.shape[0], mb.ids.shape[1], V, generator=g, dtype=torch.float64) * 2).requires_grad_()


def _logits(mb, seed=0):
    """What the model returns: the logits at the micro-batch's positions, row-major."""
    return _full_logits(mb, seed)[mb.positions]


@pytest.mark.parametrize("name,policy,reference", [
    ("mdu", ["forget", "retain"], ["anchor"]),
    ("ga", ["forget"], []),
    ("graddiff", ["forget", "retain"], []),
    ("npo", ["forget", "retain"], ["forget_ref"]),
    ("simnpo", ["forget", "retain"], []),
    ("wga", ["forget", "retain"], []),
    ("dpo", ["forget", "retain", "idk"], ["forget_ref", "idk_ref"]),
])
def test_passes_per_method(name, policy, reference):
    obj = build_objective(MethodConfig(name=name), MASK)
    mb = prepare(obj, _batch(), torch.Generator().manual_seed(0))
    assert [p.name for p in mb.passes if not p.reference] == policy
    assert [p.name for p in mb.passes if p.reference] == reference
    assert mb.n_policy == 2 * len(policy) and mb.ids.shape[0] == 2 * (len(policy) + len(reference))
    assert set(METHODS) == {"mdu", "ga", "graddiff", "npo", "simnpo", "wga", "dpo"}
    loss, metrics = microbatch_loss(obj, mb, _logits(mb), VocabShard(None, 0, V))
    assert tuple(metrics) == obj.metric_names and torch.isfinite(loss)


def test_mdu_loss_value_and_anchor_view():
    cfg = MethodConfig(name="mdu", tau=0.25, alpha=0.5)
    obj = build_objective(cfg, MASK)
    mb = prepare(obj, _batch(), torch.Generator().manual_seed(1))
    forget, anchor = mb.passes[0], mb.passes[2]
    assert anchor.reference and torch.equal(anchor.positions, forget.positions)
    f = mb.drawn["forget"]
    assert (anchor.ids[~f.response] == MASK).all() and torch.equal(anchor.ids[f.response], f.noisy[f.response])
    full = _full_logits(mb)
    loss, metrics = microbatch_loss(obj, mb, full[mb.positions], VocabShard(None, 0, V))
    rows = {p.name: full[2 * i: 2 * i + 2] for i, p in enumerate(mb.passes)}
    log_p = torch.log_softmax(rows["forget"][f.masked], -1)
    log_q = torch.log_softmax(0.25 * rows["anchor"][f.masked].detach(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    r = mb.drawn["retain"]
    nll = -torch.log_softmax(rows["retain"], -1).gather(-1, r.clean[..., None])[..., 0]
    retain = ((nll * r.masked / r.t[:, None]).sum(1) / r.response.sum(1)).mean()
    assert loss.item() == pytest.approx((kl + 0.5 * retain).item(), rel=1e-12)
    assert metrics["kl"] == pytest.approx(kl.item(), rel=1e-12)
    loss.backward()
    assert full.grad[4:].abs().sum() == 0  # no gradient reaches the anchor rows


def test_graddiff_is_ga_plus_alpha_retain():
    batch, logits_seed = _batch(), 2
    ga = build_objective(MethodConfig(name="ga"), MASK)
    gd = build_objective(MethodConfig(name="graddiff", alpha=0.3), MASK)
    mb_ga = prepare(ga, batch, torch.Generator().manual_seed(4))
    mb_gd = prepare(gd, batch, torch.Generator().manual_seed(4))
    assert torch.equal(mb_ga.drawn["forget"].noisy, mb_gd.drawn["forget"].noisy)
    full = _full_logits(mb_gd, logits_seed)
    loss_gd, m = microbatch_loss(gd, mb_gd, full[mb_gd.positions], VocabShard(None, 0, V))
    loss_ga, _ = microbatch_loss(ga, mb_ga, full[:2][mb_ga.positions], VocabShard(None, 0, V))
    assert loss_gd.item() == pytest.approx(loss_ga.item() + 0.3 * m["retain-loss"], rel=1e-12)
    assert loss_ga.item() == pytest.approx(m["forget-loss"], rel=1e-12)


def test_no_masked_position_gives_zero_not_nan():
    obj = build_objective(MethodConfig(name="mdu", alpha=0.0), MASK)
    batch = _batch()
    mb = prepare(obj, batch, torch.Generator().manual_seed(0))
    for p in mb.passes:
        p.positions.zero_()
    mb.positions.zero_()
    mb.drawn["forget"].masked.zero_()
    full = _full_logits(mb)
    loss, metrics = microbatch_loss(obj, mb, full[mb.positions], VocabShard(None, 0, V))
    loss.backward()
    assert loss.item() == 0.0 and metrics["masked-positions"] == 0
    assert torch.isfinite(full.grad).all()


def test_bad_method_config():
    with pytest.raises(ValueError, match="method.name='rmu' is not a known method \\(known: mdu, ga, graddiff"):
        build_objective(MethodConfig(name="rmu"), MASK)
    with pytest.raises(ValueError, match="method.tau=-0.5 must be >= 0"):
        build_objective(MethodConfig(tau=-0.5), MASK)
    with pytest.raises(ValueError, match="method.direction='sideways' must be one of forward, reverse, js"):
        build_objective(MethodConfig(name="mdu", direction="sideways"), MASK)
    with pytest.raises(ValueError, match="needs batch parts \\['idk'\\]"):
        prepare(build_objective(MethodConfig(name="dpo"), MASK), {"forget": _pairs(), "retain": _pairs()},
                torch.Generator())
