"""docs/examples/ run end to end on tiny files written in each dataset's own format.

Each example's ``main()`` runs in-process against a 2-shard in-process PS
(``--addresses``), with small flags; the DeepRec one also runs as a script that
starts its own local 2-shard PS (the path a user without a cluster takes). The
datasets themselves are never bundled (licences): README "Public datasets".
"""

from __future__ import annotations

import importlib
import random
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from embps.client import PSClient

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
Factory = Callable[..., list]


def _example(name: str) -> ModuleType:
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


@pytest.fixture
def addresses(inproc_factory: Factory) -> Iterator[str]:
    shards = inproc_factory(2)
    with PSClient([s.address for s in shards]) as ps:
        ps.wait_ready()
    yield ",".join(s.address for s in shards)


def _movielens(path: Path, n: int = 1500) -> Path:
    """ML-1M's ratings.dat format: user::movie::rating::timestamp, popular movies first."""
    rnd = random.Random(3)
    lines = []
    for i in range(n):
        movie = min(int(rnd.paretovariate(0.8)), 2500)
        lines.append(f"{rnd.randint(1, 400)}::{movie}::{rnd.randint(1, 5)}::{978300760 + i}\n")
    path.write_text("".join(lines))
    return path


def _criteo(path: Path, n: int = 1200) -> Path:
    """Criteo Kaggle train.txt: label, 13 integers, 26 hex categoricals, some empty."""
    rnd = random.Random(5)
    lines = []
    for _ in range(n):
        ints = [str(rnd.randint(-1, 40)) if rnd.random() > 0.1 else "" for _ in range(13)]
        cats = [f"{rnd.randint(0, 20 + 40 * k):08x}" if rnd.random() > 0.05 else ""
                for k in range(26)]  # fmt: skip
        lines.append("\t".join([str(int(rnd.random() < 0.25)), *ints, *cats]) + "\n")
    path.write_text("".join(lines))
    return path


def test_movielens_memory_efficient_prints_both_models(
    tmp_path: Path, addresses: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _movielens(tmp_path / "ratings.dat")
    mod = _example("movielens_memory_efficient")
    assert mod.main(["--data", str(data), "--addresses", addresses, "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "1500 ratings" in out and "train 1275, validation 225" in out
    assert re.search(r"baseline epoch 1/1: train_mse=[\d.]+ val_mse=[\d.]+", out)
    assert re.search(r"memory-efficient epoch 1/1: train_mse=[\d.]+ val_mse=[\d.]+", out)
    base = re.search(r"^baseline: +val_mse=([\d.]+) parameters=([\d,]+)$", out, re.M)
    eff = re.search(r"^memory-efficient: val_mse=([\d.]+) parameters=([\d,]+) ", out, re.M)
    assert base and eff, out
    assert 0 < float(base[1]) < 16 and 0 < float(eff[1]) < 16  # ratings 1..5
    assert int(eff[2].replace(",", "")) < int(base[2].replace(",", ""))


def test_deeprec_adaptive_embedding_prints_four_steps(
    addresses: str, capsys: pytest.CaptureFixture[str]
) -> None:
    mod = _example("deeprec_adaptive_embedding")
    assert mod.main(["--addresses", addresses]) == 0
    out = capsys.readouterr().out
    steps = re.findall(r"^step (\d): loss=(-?[\d.]+) own rows=(\d+)$", out, re.M)
    assert [s[0] for s in steps] == ["0", "1", "2", "3"]
    assert {s[2] for s in steps} == {"5"}  # the mask promoted ids 0, 2, 4, 6, 8 at once
    assert len(re.findall(r"^  id \d \((own|static) *\) \[", out, re.M)) == 40
    losses = [float(s[1]) for s in steps]
    assert losses[-1] < losses[0]  # d loss / d emb = 2 > 0: every step lowers the rows
    assert "after 4 steps: loss=" in out


def test_deeprec_adaptive_embedding_runs_as_a_script_with_its_own_ps(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "deeprec_adaptive_embedding.py"), "--dim", "2"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "started a local 2-shard PS on 127.0.0.1:" in proc.stdout
    assert "step 3: loss=" in proc.stdout and "after 4 steps" in proc.stdout


def test_criteo_dlrm_trains_and_scores_held_out_batches(
    tmp_path: Path, addresses: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _criteo(tmp_path / "train.txt")
    mod = _example("criteo_dlrm")
    argv = ["--data", str(data), "--addresses", addresses, "--max-rows", "1000",
            "--batch-size", "100", "--eval-every", "5", "--log-every", "4"]  # fmt: skip
    assert mod.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"^step 4: 400 samples, train_logloss=[\d.]+", out, re.M)
    assert re.search(r"^trained on 800 samples in 8 steps, .*rows on the PS$", out, re.M)
    m = re.search(r"^eval on 200 held-out samples: auc=([\d.]+) logloss=([\d.]+) ", out, re.M)
    assert m, out
    assert 0 <= float(m[1]) <= 1 and float(m[2]) > 0
