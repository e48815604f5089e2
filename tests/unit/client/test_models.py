"""DLRM (embps.client.demo.models) with local torch embeddings: shapes, interactions, learning."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch)")

from embps.client.data import SyntheticCTR, auc  # noqa: E402
from embps.client.demo.models import DLRM, mlp, pairwise_dots  # noqa: E402


def test_pairwise_dots_is_the_strict_upper_triangle() -> None:
    t = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
    got = pairwise_dots(t)
    want = torch.stack(
        [(t[:, i] * t[:, j]).sum(-1) for i in range(5) for j in range(i + 1, 5)], dim=1
    )
    assert got.shape == (3, 10)
    torch.testing.assert_close(got, want)


def test_mlp_layers_and_final_activation() -> None:
    assert isinstance(mlp([4, 8, 2])[-1], torch.nn.ReLU)
    assert isinstance(mlp([4, 8, 2], final_activation=False)[-1], torch.nn.Linear)
    with pytest.raises(ValueError, match="at least an input and an output"):
        mlp([4])


@pytest.mark.parametrize("num_dense", [0, 3])
@pytest.mark.parametrize("concat", [False, True])
def test_dlrm_shapes(num_dense: int, concat: bool) -> None:
    embs = [torch.nn.Embedding(10, 4) for _ in range(3)]
    model = DLRM(embs, num_dense=num_dense, dim=4, bottom=(8,), top=(8,), concat_embeddings=concat)
    sparse = torch.randint(0, 10, (6, 3))
    dense = torch.randn(6, num_dense)
    assert model(sparse, dense).shape == (6,)
    n = 3 + (1 if num_dense else 0)
    width = n * (n - 1) // 2 + 4 * ((1 if num_dense else 0) + (3 if concat else 0))
    assert model.top[0].in_features == width


def test_dlrm_rejects_bad_inputs() -> None:
    model = DLRM([torch.nn.Embedding(10, 4)] * 2, num_dense=3, dim=4)
    with pytest.raises(ValueError, match=r"sparse must be \(B, 2\)"):
        model(torch.zeros(4, 3, dtype=torch.int64), torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"dense must be \(4, 3\)"):
        model(torch.zeros(4, 2, dtype=torch.int64), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="at least one embedding"):
        DLRM([], num_dense=3, dim=4)


class _Recorder(torch.nn.Embedding):
    """An embedding that records prefetch / flush / close calls."""

    def __init__(self, staleness: int) -> None:
        super().__init__(10, 4)
        self.staleness = staleness
        self.calls: list[str] = []

    def prefetch(self, ids: object) -> None:
        self.calls.append("prefetch")

    def flush(self) -> None:
        self.calls.append("flush")

    def close(self) -> None:
        self.calls.append("close")


def test_pipelining_calls_reach_embeddings_that_can_prefetch() -> None:
    sync, piped = _Recorder(0), _Recorder(1)
    model = DLRM([sync, piped, torch.nn.Embedding(10, 4)], num_dense=0, dim=4)
    model.prefetch(np.zeros((2, 3), dtype=np.int64))
    model.flush()
    model.close()
    assert sync.calls == ["flush", "close"]  # staleness 0 cannot prefetch: forward pulls
    assert piped.calls == ["prefetch", "flush", "close"]


def test_dlrm_learns_planted_clicks() -> None:
    torch.manual_seed(0)
    gen = SyntheticCTR(num_fields=3, vocab_sizes=50, zipf_exponents=0.5, num_dense=2, seed=3,
                       new_id_rate=0.0, weight_scale=1.0)  # fmt: skip
    vocab = [np.sort(gen.id_of_rank(f, np.arange(1, 51))) for f in range(3)]

    def rows(sparse: np.ndarray) -> torch.Tensor:
        """Tagged ids -> rows 0..49 of each field's local embedding."""
        return torch.from_numpy(
            np.stack([np.searchsorted(vocab[f], sparse[:, f]) for f in range(3)], axis=1)
        )

    model = DLRM([torch.nn.Embedding(50, 8) for _ in range(3)], num_dense=2, dim=8,
                 bottom=(16,), top=(16,), concat_embeddings=True)  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for b in gen.batches(512, 150):
        loss = loss_fn(model(rows(b.sparse), torch.from_numpy(b.dense)), torch.from_numpy(b.labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
    test = gen.generate(512 * 150, 20_000)
    with torch.no_grad():
        scores = model(rows(test.sparse), torch.from_numpy(test.dense)).numpy()
    assert test.probs is not None
    optimum = auc(test.labels, test.probs)
    assert auc(test.labels, scores) > optimum - 0.03
