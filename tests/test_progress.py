"""Progress bars: redrawn on a terminal, rate-limited lines in a log file."""
import io

from cliperase.engine import progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_writes_a_handful_of_lines_when_the_output_is_not_a_terminal(monkeypatch):
    log = io.StringIO()
    for _ in progress.progress_bar(range(2000), desc="steps", file=log):
        pass
    lines = [x for x in log.getvalue().replace("\r", "\n").splitlines() if x.strip()]
    assert 1 <= len(lines) <= 3, lines
    assert "2000/2000" in lines[-1], "the last state is written when the bar closes"
    # A short interval: then every update past it writes.
    monkeypatch.setattr(progress, "NON_TTY_INTERVAL_S", 0.0)
    chatty = io.StringIO()
    for _ in progress.progress_bar(range(50), file=chatty):
        pass
    assert chatty.getvalue().count("/50") > 3


def test_a_postfix_waits_for_the_next_line_when_the_output_is_not_a_terminal():
    """The training loop sets the loss as a postfix at every logged step."""
    log = io.StringIO()
    bar = progress.progress_bar(range(2000), desc="steps", file=log)
    for step in bar:
        bar.set_postfix(loss=f"{step / 1000:.4f}")
    bar.close()
    lines = [x for x in log.getvalue().replace("\r", "\n").splitlines() if x.strip()]
    assert 1 <= len(lines) <= 3, lines
    assert "2000/2000" in lines[-1] and "loss=1.9990" in lines[-1], lines[-1]


def test_on_a_terminal_the_bar_redraws_as_tqdm_does():
    tty = _Tty()
    bar = progress.progress_bar(range(20), file=tty)
    for step in bar:
        if step == 19:
            before = tty.getvalue()
            bar.set_postfix(loss="0.5")  # drawn at once, as tqdm does
            assert tty.getvalue() != before and tty.getvalue().rstrip().endswith("loss=0.5]")
    assert "\r" in tty.getvalue() and "20/20" in tty.getvalue()


def test_a_disabled_bar_writes_nothing():
    log = io.StringIO()
    for _ in progress.progress_bar(range(10), file=log, enabled=False):
        pass
    assert log.getvalue() == ""
