"""Progress bars: drawn on a terminal's stderr; nothing in a pipe, a file or with ``--json``."""

import io
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from napari_segtool.cli import main
from napari_segtool.io import write_image
from tests.training.conftest import blobs, tiny_model

CPU = ["--device", "cpu", "--precision", "fp32"]
TRAIN = ["--epochs", "2", "--steps-per-epoch", "3", "--batch-size", "2",
         "--patch-shape", "32,32", *CPU]  # fmt: skip
BAR = re.compile(r"\|[#\u2588]+\|")  # a drawn bar: full blocks, or "#" where the stream
# declares no encoding (tqdm's ASCII bars)


class Terminal(io.StringIO):
    """A stderr that says it is a terminal (what tqdm and the command check)."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def files(tmp_path):
    image, labels = blobs((6, 48, 48))
    img = write_image(tmp_path / "img.tif", image)
    lab = write_image(tmp_path / "lab.tif", labels)
    return img, lab, tiny_model().save(tmp_path / "tiny.pt")


def _run(argv, monkeypatch, capsys, *, terminal):
    """Run a command in this process; return (its stdout, what reached stderr)."""
    err = Terminal() if terminal else None
    if err is not None:
        monkeypatch.setattr(sys, "stderr", err)
    assert main([str(a) for a in argv]) == 0
    captured = capsys.readouterr()
    return captured.out, err.getvalue() if err is not None else captured.err


def _rate(err: str, unit: str) -> bool:
    """tqdm shows a rate as ``4.5tile/s``, or as ``1.2s/step`` when an item is slow."""
    return f"{unit}/s" in err or f"s/{unit}" in err


def _segment_argv(files, tmp_path):
    img, _, model = files
    return ["segment", img, "-o", tmp_path / "o.tif", "--model", model, "--batch-size", "1",
            "--compile", "off", *CPU]  # fmt: skip


def test_segment_is_silent_off_a_terminal(files, tmp_path, monkeypatch, capsys):
    out, err = _run(_segment_argv(files, tmp_path), monkeypatch, capsys, terminal=False)
    assert err == ""
    assert json.loads(out)["shape"] == [6, 48, 48]


def test_segment_counts_tiles_on_a_terminal(files, tmp_path, monkeypatch, capsys):
    out, err = _run(_segment_argv(files, tmp_path), monkeypatch, capsys, terminal=True)
    assert "segment: 100%" in err
    assert "6/6 [" in err  # one 48 x 48 slice per tile, batch 1: six tiles
    assert _rate(err, "tile")
    assert BAR.search(err)
    assert json.loads(out)["shape"] == [6, 48, 48]  # stdout holds only the JSON


@pytest.mark.parametrize("terminal", [False, True])
def test_train_counts_steps_with_the_loss(files, tmp_path, monkeypatch, capsys, terminal):
    img, lab, model = files
    argv = ["train", img, lab, "-o", tmp_path / "m.pt", "--init", model, *TRAIN]
    out, err = _run(argv, monkeypatch, capsys, terminal=terminal)
    assert json.loads(out)["output"] == str(tmp_path / "m.pt")
    if not terminal:
        assert err == ""
        return
    assert "train: 100%" in err
    assert "6/6 [" in err  # 2 epochs x 3 steps
    assert _rate(err, "step")
    assert "loss " in err
    assert "val Dice " in err  # the held-out slices' Dice after the first epoch


def test_finetune_counts_steps_then_tiles(files, tmp_path, monkeypatch, capsys):
    img, lab, model = files
    folder = tmp_path / "p.segtool"
    argv = ["project", folder, "--create", img, "--labels", lab, "--reviewed", "0,1,2,3",
            "--model", model]  # fmt: skip
    _, err = _run(argv, monkeypatch, capsys, terminal=True)
    assert err == ""  # `project` does no long work: no bar
    argv = ["finetune", folder, "--epochs", "2", "--steps-per-epoch", "4",
            "--learning-rate", "0.01", *CPU]  # fmt: skip
    out, err = _run(argv, monkeypatch, capsys, terminal=True)
    result = json.loads(out)
    assert "finetune: 100%" in err
    assert "8/8 [" in err
    assert _rate(err, "step")
    # a promoted round re-segments the image, with flip TTA: a second bar, of tiles
    assert _rate(err, "tile") == result["promoted"]
    assert result["promoted"]  # trained on four slices, it beats the random tiny start


def test_simulate_counts_rounds_and_is_quiet_with_json(files, monkeypatch, capsys):
    img, lab, model = files
    argv = ["simulate", img, lab, "--init", model, "--strategy", "random", "--initial", "2",
            "--rounds", "1", "--per-round", "1", "--seeds", "2", *TRAIN,
            "--epochs", "1"]  # fmt: skip
    out, err = _run(argv, monkeypatch, capsys, terminal=True)
    assert "simulate: 100%" in err
    assert "4/4 [" in err  # 2 seeds x (the first round + 1)
    assert _rate(err, "round")
    lines = out.splitlines()  # the per-round lines stay on stdout, one per round
    assert len(lines) == 4
    assert all(line.startswith("seed ") for line in lines)
    out, err = _run([*argv, "--json"], monkeypatch, capsys, terminal=True)
    assert err == ""
    assert len(json.loads(out)["seeds"]) == 2


def test_a_real_terminal_gets_the_bar_and_log_lines_of_their_own(files, tmp_path):
    """``-v`` on a pseudo-terminal: the bar is drawn, and each log line starts a fresh line
    (written above the bar, not glued onto it)."""
    import fcntl
    import termios

    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    argv = [sys.executable, "-m", "napari_segtool.cli", "-v",
            *map(str, _segment_argv(files, tmp_path))]  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=secondary, cwd=root,
                          env=env) as proc:  # fmt: skip
        os.close(secondary)
        chunks = []
        while True:
            ready, _, _ = select.select([primary], [], [], 120)
            if not ready:
                proc.kill()
                pytest.fail("no output from the command on its terminal for 120 s")
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # EIO: the command closed its end of the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(primary)
        stdout = proc.stdout.read()
        assert proc.wait(timeout=60) == 0
    screen = b"".join(chunks).decode()
    assert json.loads(stdout)["shape"] == [6, 48, 48]
    assert "segment: 100%" in screen
    assert "6/6 [" in screen
    assert "\u2588" in screen  # a real terminal: unicode blocks
    logs = [i for i in range(len(screen)) if screen.startswith("INFO napari_segtool:", i)]
    assert logs, screen
    for i in logs:  # each log line begins after a newline or a carriage return
        assert i == 0 or screen[i - 1] in "\r\n", repr(screen[max(0, i - 80) : i + 40])


def test_progress_bar_is_disabled_off_a_terminal_and_when_quiet(monkeypatch):
    from napari_segtool.cli._common import is_terminal, progress_bar

    assert not is_terminal(io.StringIO())
    assert not is_terminal(None)
    closed = io.StringIO()
    closed.close()  # isatty() raises on a closed stream
    assert not is_terminal(closed)
    for stderr, quiet, disabled in [(Terminal(), False, False), (Terminal(), True, True),
                                    (io.StringIO(), False, True)]:  # fmt: skip
        monkeypatch.setattr(sys, "stderr", stderr)
        with progress_bar("x", unit="tile", total=2, quiet=quiet) as bar:
            assert bar.disable is disabled
            bar.update(2)
        assert ("2/2" in stderr.getvalue()) is not disabled
