"""The leaderboard as a PNG (`rlhfkit feedback leaderboard --png`): drawn from a hand-built
Leaderboard, and from a real server's over gRPC."""

import math

import matplotlib
import numpy as np
import pytest
from matplotlib import colors

matplotlib.use("Agg")
import matplotlib.image  # noqa: E402

from rlhfkit.clients.cli import main as cli_main  # noqa: E402
from rlhfkit.clients.plots import PLAIN_COLOR, STYLE_COLOR, WIN_RATE_CMAP, leaderboard_png  # noqa: E402
from rlhfkit.v1 import feedback_pb2 as fb  # noqa: E402

NAN = math.nan
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def board(styled: bool) -> fb.Leaderboard:
    """Three models; ppo-1 met sft-1 (won 75% of 8) and sft-1 met dpo-1 (won 60% of 10)."""
    def rating(model, bt, battles, sc):
        r = fb.ModelRating(model=model, bradley_terry=bt, bradley_terry_lower=bt - 40, bradley_terry_upper=bt + 40,
                           battles=battles)
        if styled:
            r.style_controlled, r.style_controlled_lower, r.style_controlled_upper = sc, sc - 50, sc + 50
        return r

    return fb.Leaderboard(
        num_battles=18, num_votes=20, prior_sd=200, models=["sft-1", "ppo-1", "dpo-1"],
        ratings=[rating("ppo-1", 1060, 8, 1040), rating("sft-1", 980, 18, 990), rating("dpo-1", 960, 10, 970)],
        win_rates=[fb.WinRateRow(model="sft-1", win_rates=[NAN, 0.25, 0.6], battles=[0, 8, 10]),
                   fb.WinRateRow(model="ppo-1", win_rates=[0.75, NAN, NAN], battles=[8, 0, 0]),
                   fb.WinRateRow(model="dpo-1", win_rates=[0.4, NAN, NAN], battles=[10, 0, 0])])


def pixels_near(image: np.ndarray, color, tol: float = 0.02) -> int:
    return int((np.abs(image[..., :3] - np.array(colors.to_rgb(color))) < tol).all(-1).sum())


def read_png(path) -> np.ndarray:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 20_000
    return matplotlib.image.imread(path)


@pytest.mark.parametrize("styled", [True, False])
def test_leaderboard_png_of_a_hand_built_board(tmp_path, styled):
    path = leaderboard_png(board(styled), tmp_path / "board.png")
    image = read_png(path)
    assert image.shape == (450, 1200, 4)  # 12 x 4.5 inches at 100 dpi
    assert image[..., :3].var() > 0.01
    # The heat map's cells in its colours (a cell is ~150 x 100 px; its text covers a little).
    cmap = matplotlib.colormaps[WIN_RATE_CMAP]
    for rate in (0.75, 0.25, 0.6, 0.4):
        assert pixels_near(image, cmap(rate)) > 5000, rate
    assert pixels_near(image, cmap(0.9)) < 1000  # no cell has 90% (the colour bar has a strip of it)
    assert pixels_near(image, "lightgrey") > 5000  # never met (the diagonal too)
    assert pixels_near(image, PLAIN_COLOR) > 100
    # Style-controlled bars only when the server sent that fit (all zero: none).
    assert (pixels_near(image, STYLE_COLOR) > 100) == styled


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_policy_dir):
    """A server whose store already holds votes between three (unserved) models."""
    from rlhfkit.server.app import ServeConfig, ServerThread
    from rlhfkit.server.feedback import FeedbackStore

    url = f"sqlite:///{tmp_path_factory.mktemp('fb') / 'board.db'}"
    store = FeedbackStore(url)
    for i, (a, b, choice) in enumerate([("ppo-1", "sft-1", "left")] * 5 + [("ppo-1", "sft-1", "right")]
                                       + [("sft-1", "dpo-1", "left")] * 3 + [("sft-1", "dpo-1", "tie")]):
        cid = store.add_comparison("p", "models", (a, f"{a}@1", f"from {a}"), (b, f"{b}@1", f"from {b} **x**"))
        store.add_vote(cid, choice, f"ann{i}")
    store.close()
    srv = ServerThread(ServeConfig(policy=str(tiny_policy_dir), port=0, device="cpu", feedback_db=url)).wait_loaded()
    yield srv
    srv.stop()


def test_cli_leaderboard_png(server, tmp_path, capsys):
    out = tmp_path / "lb.png"
    assert cli_main(["feedback", "leaderboard", "--address", server.address, "--bootstrap-rounds", "10",
                     "--prior-sd", "150", "--png", str(out)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == "10 battles (10 votes)" and "style-ctrl" in lines[1] and "battles" in lines[1]
    # ppo-1 won 5 of 6 against sft-1, which won 3.5 of 4 against dpo-1; battles per model 6, 10, 4.
    assert [(line.split()[0], line.split()[-2]) for line in lines[2:]] == [("ppo-1", "6"), ("sft-1", "10"),
                                                                          ("dpo-1", "4")]
    assert f"wrote {out}" in captured.err
    image = read_png(out)
    assert image.shape == (450, 1200, 4) and image[..., :3].var() > 0.01
    cmap = matplotlib.colormaps[WIN_RATE_CMAP]
    assert pixels_near(image, cmap(5 / 6)) > 5000 and pixels_near(image, cmap(3.5 / 4)) > 5000
    for bad in ("0", "-5", "inf", "nan", "0.5", "20000"):  # the server's range, checked before calling it
        message = "--prior-sd must be in [1, 10000] Elo points"
        with pytest.raises(SystemExit) as e:
            cli_main(["feedback", "leaderboard", "--address", server.address, "--prior-sd", bad])
        assert e.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(["feedback", "export", "--feedback-db", "sqlite:///x.db", "--png", str(out)])
    assert e.value.code == 2 and "--png applies to `feedback leaderboard`" in capsys.readouterr().err
