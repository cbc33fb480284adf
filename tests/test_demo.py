"""The demo runs end to end (short training) and shows what it claims."""

import pytest

from fastlaplace import demo


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return demo.main(["--quick", "--out", str(tmp_path_factory.mktemp("demo"))])


def test_writes_both_figures(result):
    assert [p.name for p in result["figures"]] == ["regression.png", "reliability.png"]
    for path in result["figures"]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 10_000


def test_regression_band_widens_away_from_the_data(result):
    assert set(result["regression"]) == {label for label, _ in demo.REGRESSORS}
    for label, r in result["regression"].items():
        assert r["std_gap"] > 1.2 * r["std_data"], label
        assert r["std_far"] > 1.2 * r["std_data"], label


def test_evidence_tuning_raises_the_evidence(result):
    tuned = [*result["regression"].values()] + [
        r for r in result["classification"].values() if "log_marglik_before" in r
    ]
    assert len(tuned) == len(demo.REGRESSORS) + len(demo.CLASSIFIERS)
    for r in tuned:
        assert r["log_marglik_after"] >= r["log_marglik_before"]


def test_classification_table_covers_every_method(result, capsys):
    labels = set(result["classification"])
    expected = {"MAP"} | {label for label, _, _ in demo.CLASSIFIERS}
    expected |= {f"{label}, δ by val NLL" for label, _, _ in demo.CLASSIFIERS}
    assert labels == expected
    for r in result["classification"].values():
        assert 0.9 < r["accuracy"] <= 1
        assert 0 <= r["ece"] <= 1 and r["nll"] > 0
    # The all-layer Kron posterior tells noised digits apart better than the MAP network.
    assert (
        result["classification"]["kron, all layers"]["auroc_noised"] > result["classification"]["MAP"]["auroc_noised"]
    )
    table = demo.format_tables(result["regression"], result["classification"])
    assert all(label in table for label in expected)
