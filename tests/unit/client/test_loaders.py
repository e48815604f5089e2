"""Loaders of the public formats (client/data.py): MovieLens, Avazu, libSVM / libFFM.

Every file is written by the test itself (tmp_path) in the dataset's own format; the
datasets are never bundled. Each loader is checked against values computed by hand
from the lines it wrote, on malformed lines (the exact ``file line n`` in the message),
gzip (by name and by magic bytes), ``skip_bad``, ``max_samples`` and a batch boundary
in the middle of the file (and of a parse chunk).
"""

from __future__ import annotations

import datetime as dt
import gzip
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from embps.client.data import (
    FIELD_SHIFT,
    LOCAL_MASK,
    MISSING_LOCAL,
    Batch,
    LineStream,
    avazu_batches,
    criteo_batches,
    field_of,
    hash_values,
    libsvm_batches,
    movielens_batches,
)

Loader = Callable[..., LineStream]


def _write(path: Path, lines: list[str], gz: bool = False) -> Path:
    data = "".join(line + "\n" for line in lines).encode()
    if gz:
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def _all(stream: LineStream) -> Batch:
    return Batch.concat(list(stream))


def _raises_at(path: Path, n: int, what: str, loader: Loader, **kw: object) -> None:
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} line {n}: .*{what}"):
        list(loader(path, 4, **kw))


# --------------------------------------------------------------------------
# MovieLens
# --------------------------------------------------------------------------

RATINGS = [(1, 1193, 5.0), (1, 661, 3.0), (2, 1357, 4.0), (3, 3421, 1.0), (6040, 3952, 2.0)]


@pytest.mark.parametrize(
    ("name", "fmt", "header"),
    [
        ("ratings.dat", "{u}::{m}::{r:g}::978300760", None),
        ("u.data", "{u}\t{m}\t{r:g}\t881250949", None),
        ("ratings.csv", "{u},{m},{r:g},1147880044", "userId,movieId,rating,timestamp"),
    ],
)
def test_movielens_formats_give_user_and_movie_fields_and_ratings(
    tmp_path: Path, name: str, fmt: str, header: str | None
) -> None:
    lines = [fmt.format(u=u, m=m, r=r) for u, m, r in RATINGS]
    path = _write(tmp_path / name, ([header] if header else []) + lines)
    stream = movielens_batches(path, 2)
    batches = list(stream)
    assert [len(b) for b in batches] == [2, 2, 1]  # boundaries inside the file
    b = Batch.concat(batches)
    assert stream.fields == ("user", "movie")
    np.testing.assert_array_equal(b.sparse[:, 0], [u for u, _, _ in RATINGS])
    np.testing.assert_array_equal(b.sparse[:, 1], [1 << FIELD_SHIFT | m for _, m, _ in RATINGS])
    np.testing.assert_array_equal(b.labels, [r for _, _, r in RATINGS])
    assert b.sparse.dtype == np.int64 and b.dense.shape == (5, 0)
    assert b.dense.dtype == np.float32 and b.labels.dtype == np.float32
    assert stream.samples == 5 and stream.lines == 5 + (header is not None)


@pytest.mark.parametrize(
    ("line", "what"),
    [
        ("1::2::3", None),  # 3 columns are fine (no timestamp)
        ("1::2", "expected 4 '::'-separated columns .* got 2"),
        ("1::2::3::4::5", "got 5"),
        ("x::2::3::4", r"column 1 \(user\): expected a non-negative integer id, got 'x'"),
        ("1::-2::3::4", r"column 2 \(movie\)"),
        ("1::2::high::4", r"column 3 \(rating\): expected a number, got 'high'"),
        ("1::2::nan::4", r"column 3 \(rating\): expected a finite number"),
        ("1::2000000000000::3::4", "not below 2\\^40"),
    ],
)
def test_movielens_bad_lines_name_file_and_line(
    tmp_path: Path, line: str, what: str | None
) -> None:
    path = _write(tmp_path / "ratings.dat", ["1::2::3::4", "5::6::4::7", line, "8::9::1::0"])
    if what is None:
        assert len(_all(movielens_batches(path, 4))) == 4
        return
    _raises_at(path, 3, what, movielens_batches)
    stream = movielens_batches(path, 4, skip_bad=True)
    assert len(_all(stream)) == 3
    assert stream.bad_lines == 1 and stream.bad_examples[0][0] == 3


def test_movielens_unknown_separator_is_an_error_on_line_1(tmp_path: Path) -> None:
    path = _write(tmp_path / "ratings.txt", ["1 2 3 4"])
    _raises_at(path, 1, "expected '::', tab or ','", movielens_batches)


# --------------------------------------------------------------------------
# Avazu
# --------------------------------------------------------------------------

AVAZU_HEADER = "id,click,hour,C1,banner_pos,site_id,device_ip,C14"
AVAZU_ROWS = [
    "1000009418151094273,0,14102100,1005,0,1fbe01fe,ddd2926e,15706",
    "10000169349117863715,1,14102100,1005,0,1fbe01fe,96809ac8,15704",
    "10000371904215119486,0,14102813,1002,1,85f751fd,b3cf8def,21689",
    "10000640724480838376,1,14103023,1005,0,d6137915,e8275b8f,19772",
    "10000679056417042096,0,14102100,1010,0,1fbe01fe,9644d0bf,15699",
]


def test_avazu_hashes_categoricals_and_splits_the_hour(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.csv", [AVAZU_HEADER, *AVAZU_ROWS])
    stream = avazu_batches(path, 3)
    batches = list(stream)
    assert [len(b) for b in batches] == [3, 2]
    b = Batch.concat(batches)
    cat = ["C1", "banner_pos", "site_id", "device_ip", "C14"]
    assert stream.fields == (*cat, "hour_of_day", "weekday")
    np.testing.assert_array_equal(b.labels, [0, 1, 0, 1, 0])
    np.testing.assert_array_equal(field_of(b.sparse), np.broadcast_to(np.arange(7), (5, 7)))
    rows = [r.split(",") for r in AVAZU_ROWS]
    for f, name in enumerate(cat):
        col = AVAZU_HEADER.split(",").index(name)
        want = hash_values([r[col].encode() for r in rows])
        np.testing.assert_array_equal(b.sparse[:, f] & LOCAL_MASK, want)
    hours = [r[2] for r in rows]
    np.testing.assert_array_equal(b.sparse[:, 5] & LOCAL_MASK, [int(h[6:]) for h in hours])
    weekdays = [dt.date(2000 + int(h[:2]), int(h[2:4]), int(h[4:6])).weekday() for h in hours]
    assert weekdays == [1, 1, 1, 3, 1]  # 2014-10-21 was a Tuesday, 2014-10-30 a Thursday
    np.testing.assert_array_equal(b.sparse[:, 6] & LOCAL_MASK, weekdays)
    # equal values share an id, different ones do not (site_id of rows 0, 1, 4)
    assert b.sparse[0, 2] == b.sparse[1, 2] == b.sparse[4, 2] != b.sparse[2, 2]
    assert b.dense.shape == (5, 0) and stream.lines == 6


def test_hash_values_is_stable_and_spreads() -> None:
    vals = [b"", b"a", b"ab", b"1fbe01fe", b"1fbe01ff", b"x" * 100]
    h = hash_values(vals)
    assert h.dtype == np.int64 and len(set(h.tolist())) == len(vals)
    assert (h >= 0).all() and (h <= LOCAL_MASK).all()
    np.testing.assert_array_equal(hash_values(vals[::-1]), h[::-1])  # per value, not per batch
    assert hash_values([]).shape == (0,)


@pytest.mark.parametrize(
    ("line", "what"),
    [
        ("1,0,14102100,1005,0,1fbe01fe,ddd2926e", "expected 8 comma-separated columns .* got 7"),
        ("1,yes,14102100,1005,0,1fbe01fe,ddd2926e,1", r"column 2 \(click\): expected 0 or 1"),
        ("1,1,141021,1005,0,1fbe01fe,ddd2926e,1", r"column 3 \(hour\): expected YYMMDDHH"),
        ("1,1,14133100,1005,0,1fbe01fe,ddd2926e,1", r"column 3 \(hour\)"),  # month 13
        ("1,1,14102124,1005,0,1fbe01fe,ddd2926e,1", r"column 3 \(hour\)"),  # hour 24
    ],
)
def test_avazu_bad_lines_name_file_and_line(tmp_path: Path, line: str, what: str) -> None:
    path = _write(tmp_path / "train.csv", [AVAZU_HEADER, *AVAZU_ROWS[:3], line, AVAZU_ROWS[3]])
    _raises_at(path, 5, what, avazu_batches)
    stream = avazu_batches(path, 4, skip_bad=True)
    assert len(_all(stream)) == 4 and stream.bad_examples[0][0] == 5


def test_avazu_without_click_column_is_refused_on_line_1(tmp_path: Path) -> None:
    path = _write(tmp_path / "test.csv", ["id,hour,C1", "1,14102100,1005"])
    _raises_at(path, 1, "missing \\['click'\\]", avazu_batches)


# --------------------------------------------------------------------------
# libSVM / libFFM
# --------------------------------------------------------------------------

FRAPPE = [
    "1 451:1 4149:1 5041:1",
    "-1 12:1 4150:1 5040:0.5",
    "-1 451:1 4151:1 5042:1",
    "1 13:1 4149:1 5041:1",
    "0 14:1 4152:1 5043:2",
]


def test_libsvm_kth_feature_is_field_k_and_values_are_dense(tmp_path: Path) -> None:
    path = _write(tmp_path / "frappe.libfm", FRAPPE)
    stream = libsvm_batches(path, 2, chunk_lines=3)  # batches cut across parse chunks
    batches = list(stream)
    assert [len(b) for b in batches] == [2, 2, 1]
    b = Batch.concat(batches)
    assert stream.fields == ("f0", "f1", "f2")
    np.testing.assert_array_equal(b.labels, [1, 0, 0, 1, 0])
    want = [[int(t.split(":")[0]) for t in line.split()[1:]] for line in FRAPPE]
    np.testing.assert_array_equal(b.sparse & LOCAL_MASK, want)
    np.testing.assert_array_equal(field_of(b.sparse), np.broadcast_to(np.arange(3), (5, 3)))
    np.testing.assert_array_equal(b.dense[:, 2], [1, 0.5, 1, 1, 2])
    assert b.dense.dtype == np.float32


def test_libsvm_regression_labels_with_binary_off(tmp_path: Path) -> None:
    path = _write(tmp_path / "r.libsvm", ["3.5 1:1", "-0.25 2:1"])
    np.testing.assert_array_equal(_all(libsvm_batches(path, 4, binary=False)).labels, [3.5, -0.25])
    _raises_at(path, 1, "label: expected -1, 0 or 1, got '3.5'", libsvm_batches)


def test_libffm_fields_are_given_and_missing_ones_read_missing_local(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.ffm", ["1 0:7:1 2:9:0.5 1:8:1", "0 2:3:1", "1 1:5:0.25"])
    stream = libsvm_batches(path, 8)
    b = _all(stream)
    assert stream.ffm and stream.fields == ("f0", "f1", "f2")
    np.testing.assert_array_equal(
        b.sparse & LOCAL_MASK, [[7, 8, 9], [MISSING_LOCAL, MISSING_LOCAL, 3],
                                [MISSING_LOCAL, 5, MISSING_LOCAL]]
    )  # fmt: skip
    np.testing.assert_array_equal(b.dense, [[1, 1, 0.5], [0, 0, 1], [0, 0.25, 0]])
    np.testing.assert_array_equal(field_of(b.sparse), np.broadcast_to(np.arange(3), (3, 3)))


@pytest.mark.parametrize(
    ("line", "what", "kw"),
    [
        ("1 451:1 4149:1", "expected 3 idx:val features, got 2", {}),
        ("1 451:1 4149:1 1:1 2:1", "got 4", {}),
        ("yes 451:1 4149:1 5041:1", "label: expected a number, got 'yes'", {}),
        ("2 451:1 4149:1 5041:1", "label: expected -1, 0 or 1, got '2'", {}),
        ("1 451:1 4149 5041:1", "feature 2: expected idx:val, got '4149'", {}),
        ("1 451:1 a:1 5041:1", r"feature 2 \(idx\): expected a non-negative integer id", {}),
        ("1 451:1 4149:x 5041:1", r"feature 2 \(val\): expected a number, got 'x'", {}),
        ("1 451:1 4149:1:1 5041:1", "feature 2: expected idx:val", {}),
        ("", "empty line", {}),
    ],
)
def test_libsvm_bad_lines_name_file_and_line(
    tmp_path: Path, line: str, what: str, kw: dict[str, object]
) -> None:
    path = _write(tmp_path / "frappe.libfm", [*FRAPPE[:3], line, FRAPPE[3]])
    _raises_at(path, 4, what, libsvm_batches, **kw)
    stream = libsvm_batches(path, 4, skip_bad=True)
    assert len(_all(stream)) == 4 and stream.bad_lines == 1
    assert stream.bad_examples[0][0] == 4


@pytest.mark.parametrize(
    ("line", "what"),
    [
        ("1 0:1:1 3:2:1", "field 3 is not below num_fields = 3"),
        ("1 0:1:1 0:2:1", "field 0 appears twice"),
        ("1 0:1:1 1:2", "feature 2: expected field:idx:val, got '1:2'"),
    ],
)
def test_libffm_bad_lines_name_file_and_line(tmp_path: Path, line: str, what: str) -> None:
    path = _write(tmp_path / "c.ffm", ["1 0:7:1 2:9:0.5", line])
    _raises_at(path, 2, what, libsvm_batches)


# --------------------------------------------------------------------------
# Shared: gzip, max_samples, long lines, Criteo by magic bytes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["data.gz", "data.txt"])  # by suffix, by magic bytes
@pytest.mark.parametrize(
    ("loader", "lines"),
    [
        (movielens_batches, [f"{u}::{m}::{r:g}::0" for u, m, r in RATINGS]),
        (avazu_batches, [AVAZU_HEADER, *AVAZU_ROWS]),
        (libsvm_batches, FRAPPE),
    ],
)
def test_gzip_reads_the_same_as_plain(
    tmp_path: Path, name: str, loader: Loader, lines: list[str]
) -> None:
    plain = _all(loader(_write(tmp_path / "plain", lines), 2))
    packed = _all(loader(_write(tmp_path / name, lines, gz=True), 2))
    np.testing.assert_array_equal(plain.sparse, packed.sparse)
    np.testing.assert_array_equal(plain.dense, packed.dense)
    np.testing.assert_array_equal(plain.labels, packed.labels)


def test_gzip_line_numbers_in_errors(tmp_path: Path) -> None:
    path = _write(tmp_path / "frappe.gz", [*FRAPPE, "1 1:1"], gz=True)
    _raises_at(path, 6, "expected 3 idx:val features, got 1", libsvm_batches)


def test_max_samples_drop_last_and_no_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "frappe.libfm"
    path.write_text("\n".join(FRAPPE))  # no newline after the last line
    assert len(_all(libsvm_batches(path, 2))) == 5
    stream = libsvm_batches(path, 2, max_samples=3)
    assert [len(b) for b in stream] == [2, 1] and stream.lines == 3
    assert [len(b) for b in libsvm_batches(path, 2, drop_last=True)] == [2, 2]


def test_a_line_past_the_limit_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import embps.client.data as data

    monkeypatch.setattr(data, "MAX_LINE_BYTES", 40)
    path = _write(tmp_path / "frappe.libfm", [FRAPPE[0], "1 " + "1:1 " * 20])
    _raises_at(path, 2, "longer than 40 bytes", libsvm_batches)


def test_criteo_reads_gzip_by_magic_bytes(tmp_path: Path) -> None:
    line = "\t".join(["1", *["3"] * 13, *["0000000a"] * 26])
    path = _write(tmp_path / "day_0", [line, line], gz=True)  # no .gz in the name
    b = _all(criteo_batches(path, 4))
    assert len(b) == 2 and (b.sparse & LOCAL_MASK == 10).all()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        movielens_batches("x", 0)
    with pytest.raises(ValueError, match="max_samples"):
        avazu_batches("x", 1, max_samples=-1)
    with pytest.raises(ValueError, match="num_fields"):
        libsvm_batches("x", 1, num_fields=0)


@pytest.mark.parametrize("loader", [movielens_batches, avazu_batches, libsvm_batches])
def test_an_empty_file_yields_nothing(tmp_path: Path, loader: Loader) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    stream = loader(path, 4)
    assert list(stream) == [] and stream.lines == 0 and stream.samples == 0


def test_libsvm_fast_path_and_checked_parse_agree() -> None:
    """The fast path (no messages) takes exactly the lines the checked parse takes, with
    the same result; lines it refuses go to the checked parse, which says why."""
    from embps.client.data import LibSVMStream, _BadLine

    rng = np.random.default_rng(9)
    tokens = ["1:1", "2:0.5", "x:1", "3:y", "4", "5:1:1", "-6:1", "7:inf", "8:1e3", "+9:1"]
    labels = ["1", "-1", "0", "2", "one", "nan", "1.0", "-0"]
    stream = LibSVMStream("unused", 1, num_fields=2)
    stream.ffm = False

    def outcome(parse: Callable[[bytes], object], line: bytes) -> object:
        try:
            return parse(line)
        except _BadLine:
            return "bad"

    for _ in range(400):
        feats = rng.choice(tokens, size=int(rng.integers(1, 4)))
        line = " ".join([str(rng.choice(labels)), *feats]).encode()
        checked = outcome(stream._checked, line)
        assert outcome(stream._parse_line, line) == checked, line  # fast path or checked
