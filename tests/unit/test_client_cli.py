"""The client commands' pure parts: how events read, the bar, JSON lines, preview names, flags."""

from __future__ import annotations

import base64
import io
import json
import time

import pytest

from orchestrator.adapters.avro import PreviewRecord, ProgressEventRecord
from orchestrator.cli import build_parser, request_from_args
from orchestrator.client_cli import ProgressDisplay, bar, describe, event_json, preview_name


def ev(event: str, step: int = 0, steps: int = 0, **kw: object) -> ProgressEventRecord:
    return ProgressEventRecord("r-1", event, 1_700_000_000_000, step, steps, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("event", "images", "text"),
    [
        (ev("queued"), 1, "queued"),
        (ev("queued", queue_position=3), 1, "queued, 3 ahead"),
        (ev("started", 0, 20), 1, "started, 20 steps"),
        (ev("started", 0, 20), 2, "started, 20 steps (each of 2 images)"),
        (ev("step", 3, 20, elapsed_ms=1250.0), 1, "step 3 of 20 [1.2 s]"),
        (ev("step", 3, 20, elapsed_ms=50.0), 4, "step 3 of 20 (each of 4 images) [0.1 s]"),
        (ev("finished", 20, 20, elapsed_ms=2000.0), 1, "finished [2.0 s]"),
        (ev("failed", reason="deadline_exceeded"), 1, "failed: deadline_exceeded [0.0 s]"),
        (ev("cancelled", reason="user", message="m"), 1, "cancelled: user: m [0.0 s]"),
        (ev("paused"), 1, "paused [0.0 s]"),
    ],
)
def test_describe(event: ProgressEventRecord, images: int, text: str) -> None:
    assert describe(event, images) == text


def test_bar() -> None:
    assert bar(0, 10, 10) == "[----------]"
    assert bar(5, 10, 10) == "[#####-----]"
    assert bar(10, 10, 10) == "[##########]"
    assert bar(12, 10, 10) == "[##########]"
    assert bar(1, 0, 4) == "[----]"


def test_event_json_round_trips_previews_in_base64() -> None:
    preview = PreviewRecord(1, 8, 6, "image/jpeg", b"\xff\xd8jpeg")
    data = json.loads(event_json(ev("step", 2, 4, previews=(preview,))))
    assert data["event"] == "step" and (data["step"], data["steps"]) == (2, 4)
    [p] = data["previews"]
    assert (p["index"], p["width"], p["height"], p["media_type"]) == (1, 8, 6, "image/jpeg")
    assert base64.b64decode(p["data_base64"]) == b"\xff\xd8jpeg"


def test_preview_name() -> None:
    assert preview_name(ev("step", 7, 20), 1, "image/jpeg") == "r-1-1-step0007.jpg"
    assert preview_name(ev("step", 7, 20), 0, "image/png") == "r-1-0-step0007.png"
    assert preview_name(ev("step", 7, 20), 0, "x/y") == "r-1-0-step0007.bin"


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_display_one_line_per_event_off_a_terminal() -> None:
    out = io.StringIO()
    display = ProgressDisplay(out, "r-1")
    for event in (ev("started", 0, 2), ev("step", 1, 2), ev("finished", 2, 2)):
        display.show(event)
    assert out.getvalue().splitlines() == [
        "r-1: started, 2 steps",
        "r-1: step 1 of 2 [0.0 s]",
        "r-1: finished [0.0 s]",
    ]


def test_display_rewrites_one_line_on_a_terminal() -> None:
    out = Tty()
    display = ProgressDisplay(out, "r-1")
    display.show(ev("step", 1, 4))
    display.show(ev("step", 2, 4))
    assert "\n" not in out.getvalue()
    assert out.getvalue().count("\r") == 2
    assert out.getvalue().endswith(f"r-1: {bar(2, 4)} step 2 of 4 [0.0 s]")
    display.show(ev("finished", 4, 4))
    assert out.getvalue().endswith("r-1: finished [0.0 s]\n")


def test_submit_flags_make_the_request() -> None:
    parser = build_parser()
    common = ["submit", "--prompt", "p", "--out", "x.png"]
    plain = request_from_args(parser.parse_args(common))
    assert (plain.priority, plain.preview, plain.deadline) == ("normal", False, None)
    t0 = time.time()
    args = parser.parse_args(
        [*common, "--priority", "high", "--deadline-s", "30", "--preview-dir", "p"]
    )
    request = request_from_args(args)
    assert (request.priority, request.preview) == ("high", True)
    assert request.deadline is not None and t0 + 29 < request.deadline < time.time() + 31
    with pytest.raises(SystemExit):
        parser.parse_args([*common, "--priority", "urgent"])


def test_cancel_and_watch_flags() -> None:
    parser = build_parser()
    cancel = parser.parse_args(["cancel", "r-9", "--reason", "why", "--wait"])
    assert (cancel.request_id, cancel.reason, cancel.wait, cancel.timeout) == (
        "r-9",
        "why",
        True,
        60.0,
    )
    watch = parser.parse_args(["watch", "r-9", "--json", "--bootstrap-servers", "h:1"])
    assert (watch.request_id, watch.json, watch.bootstrap_servers) == ("r-9", True, "h:1")
