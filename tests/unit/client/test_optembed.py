"""OptEmbed supernet pieces and the evolutionary search (client/optembed.py)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch)")

from embps.client.optembed import (  # noqa: E402
    DimensionMask,
    DimSchedule,
    OptEmbedField,
    OptEmbedSupernet,
    SearchBudget,
    evolutionary_search,
)

DIM = 8


# --------------------------------------------------------------------------
# Dimension mask
# --------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 3, DIM])
def test_only_the_first_d_columns_get_gradients(d: int) -> None:
    dm = DimensionMask(num_fields=2, dim=DIM, candidates=(d,))
    emb = torch.randn(5, DIM, requires_grad=True)
    out = dm(1, emb)
    np.testing.assert_array_equal(out[:, d:].detach().numpy(), 0.0)
    np.testing.assert_array_equal(out[:, :d].detach().numpy(), emb[:, :d].detach().numpy())
    (out * torch.randn(5, DIM)).sum().backward()
    assert emb.grad is not None
    assert (emb.grad[:, :d] != 0).all()
    np.testing.assert_array_equal(emb.grad[:, d:].numpy(), 0.0)


@pytest.mark.parametrize("d", [2, 5])
def test_a_supernet_field_masks_columns_past_d_and_trains_its_threshold(d: int) -> None:
    """Columns >= d leave the field as zeros. (They still get the threshold mask's
    straight-through gradient through the full row's norm, as in OptEmbed: the row
    pruning judges whole rows; the dimension mask alone passes none, see above.)"""
    net = OptEmbedSupernet(num_fields=1, dim=DIM, candidates=(d,), init_threshold=0.0)
    table = torch.nn.Embedding(10, DIM)
    out = OptEmbedField(table, net, 0)(torch.tensor([1, 4, 4, 7]))
    np.testing.assert_array_equal(out[:, d:].detach().numpy(), 0.0)
    (out**2).sum().backward()
    assert net.mask.threshold.grad is not None and net.mask.threshold.grad.abs().sum() > 0
    assert table.weight.grad is not None and (table.weight.grad[[1, 4, 7], :d] != 0).all()


def test_sampling_is_uniform_over_the_candidates_after_warmup() -> None:
    dm = DimensionMask(1, 16, candidates=(1, 2, 4, 8, 16), schedule=DimSchedule(warmup_steps=7))
    seen = [dm.sample(0) for _ in range(5007)]
    assert seen[:7] == [16] * 7
    counts = np.bincount(seen[7:], minlength=17)[[1, 2, 4, 8, 16]]
    assert counts.sum() == 5000
    assert np.all(np.abs(counts - 1000) < 120), counts  # about 4 SE of a uniform draw


def test_eval_uses_the_fixed_architecture() -> None:
    dm = DimensionMask(2, DIM, candidates=(1,)).eval()
    x = torch.ones(3, DIM)
    np.testing.assert_array_equal(dm(0, x).numpy(), 1.0)  # default: full width
    dm.dims[:] = torch.tensor([2, 6])
    assert dm(0, x).sum().item() == 3 * 2 and dm(1, x).sum().item() == 3 * 6


def test_fixed_dims_train_the_found_architecture_without_sampling() -> None:
    """After ``fix``, training forwards use the fixed dims (no draw, step counters stay),
    so only each field's first d_f columns learn; dims outside the candidates are refused."""
    dm = DimensionMask(2, DIM, candidates=(1, 2, 4, DIM)).train()
    dm.fix([2, 4])
    for _ in range(20):
        emb = torch.randn(3, DIM, requires_grad=True)
        (dm(0, emb) * torch.randn(3, DIM)).sum().backward()
        assert emb.grad is not None
        np.testing.assert_array_equal(emb.grad[:, 2:].numpy(), 0.0)
        assert (emb.grad[:, :2] != 0).all()
        assert dm(1, torch.ones(3, DIM)).sum().item() == 3 * 4
    assert dm.steps == [0, 0]
    with pytest.raises(ValueError, match=r"dims must be one of \[1, 2, 4, 8\] per field \(2\)"):
        dm.fix([3, 4])
    with pytest.raises(ValueError, match="per field"):
        dm.fix([2])
    assert dm.dims.tolist() == [2, 4]  # a refused fix changes nothing


def test_a_fixed_supernet_freezes_its_thresholds() -> None:
    """``OptEmbedSupernet.fix``: dims fixed and thresholds frozen: no gradient reaches
    them, the regularizer is 0, so the rows a prune will keep stop moving."""
    net = OptEmbedSupernet(num_fields=1, dim=DIM, candidates=(2, DIM), init_threshold=0.01)
    table = torch.nn.Embedding(10, DIM)
    assert net.regularization().item() > 0
    net.fix([2])
    out = OptEmbedField(table, net, 0)(torch.tensor([1, 4, 7]))
    ((out**2).sum() + net.regularization()).backward()
    assert net.regularization().item() == 0.0
    assert net.mask.threshold.grad is None and not net.mask.threshold.requires_grad
    assert net.dim_mask.fixed and net.dim_mask.dims.tolist() == [2]
    np.testing.assert_array_equal(out[:, 2:].detach().numpy(), 0.0)


def _row_grad(
    net: OptEmbedSupernet,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A row of 0.1s (norm 0.28) through field 0 with d loss / d out = 0, 1, ..., DIM-1:
    (the row, what the field output, its gradient, the step's straight-through part of
    it, (want . row) row / |row|, parallel to the row)."""
    row = torch.full((1, DIM), 0.1, requires_grad=True)
    out = net.field_forward(0, row)
    want = torch.arange(DIM, dtype=torch.float32).unsqueeze(0)
    (out * want).sum().backward()
    assert row.grad is not None
    assert net.mask.threshold.grad is not None and net.mask.threshold.grad.item() != 0
    r = row.detach()
    return r, out.detach(), row.grad, float((want * r).sum()) * r / float(r.norm())


@pytest.mark.parametrize("learn", [False, True])
def test_rows_under_the_threshold_read_zeros_and_learn_only_if_asked(learn: bool) -> None:
    """A row under its threshold reads zeros either way. Its gradient: with
    ``masked_rows_learn`` also the whole gradient of its output (it can turn towards what
    the loss wants); without, only the step's straight-through part along the row. The
    threshold learns from the step either way."""
    net = OptEmbedSupernet(1, DIM, candidates=(DIM,), init_threshold=10.0, masked_rows_learn=learn)
    _, out, grad, par = _row_grad(net)  # norm 0.28 < 10: masked
    np.testing.assert_array_equal(out.numpy(), 0.0)
    want = torch.arange(DIM, dtype=torch.float32).unsqueeze(0)
    expected = par + want if learn else par
    np.testing.assert_allclose(grad.numpy(), expected.numpy(), rtol=1e-5)


@pytest.mark.parametrize("to_rows", [True, False])
def test_the_steps_gradient_reaches_the_rows_only_if_asked(to_rows: bool) -> None:
    """A kept row's gradient: the model's, plus, with ``step_grad_to_rows`` (the paper's
    mask), the step's straight-through push along the row, (g . e) e / |e|. The
    threshold learns from the step either way."""
    net = OptEmbedSupernet(1, DIM, candidates=(DIM,), init_threshold=0.01,
                           step_grad_to_rows=to_rows)  # fmt: skip
    row, out, grad, par = _row_grad(net)  # norm 0.28 > 0.01: kept
    np.testing.assert_allclose(out.numpy(), row.numpy())
    want = torch.arange(DIM, dtype=torch.float32).unsqueeze(0)
    expected = want + par if to_rows else want
    np.testing.assert_allclose(grad.numpy(), expected.numpy(), rtol=1e-5)


def test_bad_masks_are_refused() -> None:
    with pytest.raises(ValueError, match="candidates must be dims in"):
        DimensionMask(2, DIM, candidates=(0, 4))
    with pytest.raises(ValueError, match="candidates must be dims in"):
        DimensionMask(2, DIM, candidates=(DIM + 1,))
    with pytest.raises(ValueError, match=r"emb must be \(B, 8\)"):
        DimensionMask(2, DIM)(0, torch.ones(3, 4))
    with pytest.raises(ValueError, match="full_prob"):
        DimSchedule(full_prob=1.5)


def test_the_threshold_masks_rows_and_a_deployed_field_only_pads() -> None:
    net = OptEmbedSupernet(num_fields=1, dim=4, candidates=(4,), init_threshold=1.0)
    rows = torch.tensor([[0.1, 0.1, 0.1, 0.1], [2.0, 0.0, 0.0, 0.0]])
    out = net.field_forward(0, rows)
    np.testing.assert_array_equal(out.detach().numpy(), [[0, 0, 0, 0], [2, 0, 0, 0]])
    net.deployed = True
    narrow = torch.tensor([[0.5, 0.25], [3.0, 4.0]])
    np.testing.assert_array_equal(
        net.field_forward(0, narrow).numpy(), [[0.5, 0.25, 0, 0], [3.0, 4.0, 0, 0]]
    )


# --------------------------------------------------------------------------
# Evolutionary search
# --------------------------------------------------------------------------

CANDIDATES = (1, 2, 4, 8, 16)


def _planted_problem(need: list[int], seed: int = 0, n: int = 4000):
    """A stand-in for held-out AUC: field f's signal lives in its first need[f] columns.

    Each field has a (n, 16) embedding; the label's logit is the sum over fields of the
    first need[f] columns. Score(dims) = correlation of the logit truncated to dims with
    the true logit, minus a tiny cost per column: the best architecture is exactly
    ``need`` (narrower loses signal, wider only costs).
    """
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(len(need), n, 16))
    signal = [emb[f, :, : need[f]].sum(axis=1) for f in range(len(need))]
    truth = np.sum(signal, axis=0)

    def score(dims: np.ndarray) -> float:
        pred = sum(emb[f, :, : min(int(d), need[f])].sum(axis=1) for f, d in enumerate(dims))
        return float(np.corrcoef(pred, truth)[0, 1]) - 1e-4 * float(dims.sum())

    return score


def test_search_finds_a_planted_best_architecture() -> None:
    need = [16, 1, 2, 1, 4, 1]  # one field needs the full width, the others few columns
    calls = []
    score = _planted_problem(need)

    def counted(d: np.ndarray) -> float:
        calls.append(tuple(d))
        return score(d)

    budget = SearchBudget(population=24, generations=15, parents=8, mutation_prob=0.3)
    res = evolutionary_search(counted, len(need), CANDIDATES, budget, seed=0)
    np.testing.assert_array_equal(res.dims, need)
    assert res.evaluations == len(calls) == len(set(calls))  # repeats come from the cache
    assert res.evaluations <= budget.population * budget.generations
    assert res.history == sorted(res.history)  # the best never gets worse
    assert res.score == pytest.approx(score(np.array(need)))


def test_search_respects_a_cost_budget() -> None:
    need = [16, 2, 1]
    score = _planted_problem(need)
    budget = SearchBudget(population=16, generations=10, parents=6)
    scored: list[np.ndarray] = []

    def spy(d: np.ndarray) -> float:
        scored.append(d)
        return score(d)

    res = evolutionary_search(
        spy, 3, CANDIDATES, budget, seed=1, cost=lambda d: float(d.sum()), max_cost=12
    )
    assert all(d.sum() <= 12 for d in scored)  # over-budget candidates are never scored
    np.testing.assert_array_equal(res.dims, [8, 2, 1])  # the widest field gets what is left


def test_search_is_deterministic_and_refuses_an_impossible_budget() -> None:
    score = _planted_problem([4, 4])
    a = evolutionary_search(score, 2, CANDIDATES, SearchBudget(8, 3, 4), seed=3)
    b = evolutionary_search(score, 2, CANDIDATES, SearchBudget(8, 3, 4), seed=3)
    np.testing.assert_array_equal(a.dims, b.dims)
    assert a.history == b.history
    with pytest.raises(ValueError, match="no candidate within max_cost"):
        evolutionary_search(score, 2, CANDIDATES, seed=0, cost=lambda d: float(d.sum()), max_cost=1)
    with pytest.raises(ValueError, match="parents"):
        SearchBudget(population=4, parents=5)
