"""The client commands: `orchestrator submit`, `orchestrator cancel`, `orchestrator watch`.

`cli.py` parses the flags; this module runs them on a :class:`orchestrator.client.Client`.
Progress is shown one way or the other: on a terminal, one line rewritten in place (``\\r``);
otherwise (a pipe, a log file, CI) one line per event, so the output reads as a log.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from orchestrator.adapters.avro import ProgressEventRecord
from orchestrator.domain import GenerationRequest, JobEvent

if TYPE_CHECKING:
    from orchestrator.client import Answer, JobHandle
    from orchestrator.config import Settings

#: exit codes of the client commands
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_NO_ANSWER = 3
EXIT_CANCELLED = 4
#: 128 + SIGINT: the user interrupted the command (and the request was cancelled)
EXIT_INTERRUPTED = 130

BAR_WIDTH = 24
_EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}


# -- what an event says, as text (pure) ---------------------------------------------------------


def describe(event: ProgressEventRecord, num_images: int = 1) -> str:
    """One event in words, e.g. ``step 3 of 20 [0.4 s]`` or ``failed: deadline_exceeded``."""
    seconds = f" [{event.elapsed_ms / 1000:.1f} s]"
    kind = event.event
    if kind == JobEvent.QUEUED:
        ahead = "" if event.queue_position is None else f", {event.queue_position} ahead"
        return f"queued{ahead}"
    if kind == JobEvent.STARTED:
        return f"started, {event.steps} steps" + _images(num_images)
    if kind == JobEvent.STEP:
        return f"step {event.step} of {event.steps}" + _images(num_images) + seconds
    if kind == JobEvent.FINISHED:
        return "finished" + seconds
    if kind in (JobEvent.FAILED, JobEvent.CANCELLED):
        detail = ": ".join(part for part in (event.reason, event.message) if part)
        return kind + (f": {detail}" if detail else "") + seconds
    return kind + seconds  # an event this client does not know yet


def _images(num_images: int) -> str:
    return f" (each of {num_images} images)" if num_images > 1 else ""


def bar(step: int, steps: int, width: int = BAR_WIDTH) -> str:
    """``[#########---------------]``: `step` of `steps` done."""
    done = 0 if steps <= 0 else min(width, max(0, round(width * step / steps)))
    return "[" + "#" * done + "-" * (width - done) + "]"


def event_json(event: ProgressEventRecord) -> str:
    """The event as one JSON object (previews' bytes in base64)."""
    data: dict[str, Any] = dataclasses.asdict(event)
    data["previews"] = [
        {
            "index": p.index,
            "width": p.width,
            "height": p.height,
            "media_type": p.media_type,
            "data_base64": base64.b64encode(p.data).decode("ascii"),
        }
        for p in event.previews
    ]
    return json.dumps(data, sort_keys=True)


def preview_name(event: ProgressEventRecord, index: int, media_type: str) -> str:
    """File name of a preview: ``<request id>-<image index>-step<k>.<ext>``."""
    ext = _EXTENSIONS.get(media_type, "bin")
    return f"{event.request_id}-{index}-step{event.step:04d}.{ext}"


class ProgressDisplay:
    """Shows events: in place on a terminal, one line each otherwise."""

    def __init__(self, out: TextIO, request_id: str, num_images: int = 1) -> None:
        self.out = out
        self.request_id = request_id
        self.num_images = num_images
        self.tty = out.isatty()
        self.shown = 0
        self._open_line = False

    def show(self, event: ProgressEventRecord) -> None:
        text = describe(event, self.num_images)
        self.shown += 1
        if not self.tty:
            self.out.write(f"{self.request_id}: {text}\n")
        else:
            line = text
            if event.steps > 0 and event.event in (JobEvent.STARTED, JobEvent.STEP):
                line = f"{bar(event.step, event.steps)} {text}"
            self.out.write(f"\r\x1b[2K{self.request_id}: {line}")
            self._open_line = True
            if event.event in (JobEvent.FINISHED, JobEvent.FAILED, JobEvent.CANCELLED):
                self.end_line()
        self.out.flush()

    def note(self, text: str, *, err: bool = False) -> None:
        """A line of its own (ends the in-place line first)."""
        self.end_line()
        print(text, file=sys.stderr if err else self.out, flush=True)

    def end_line(self) -> None:
        if self._open_line:
            self.out.write("\n")
            self.out.flush()
            self._open_line = False


def save_previews(event: ProgressEventRecord, directory: Path) -> list[Path]:
    paths = []
    for preview in event.previews:
        path = directory / preview_name(event, preview.index, preview.media_type)
        path.write_bytes(preview.data)
        paths.append(path)
    return paths


# -- submit ---------------------------------------------------------------------------------------


async def _follow(handle: JobHandle, display: ProgressDisplay, preview_dir: Path | None) -> None:
    async for event in handle:
        if preview_dir is not None and event.previews:
            save_previews(event, preview_dir)
        display.show(event)


def _write_images(answer: Answer, out: Path) -> None:
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    from orchestrator.imagefile import output_paths

    assert answer.result is not None
    paths = output_paths(out, len(answer.result.images))
    for path, image in zip(paths, answer.result.images, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        if image.png is not None:
            path.write_bytes(image.png)
        elif image.uri is not None:
            path.write_bytes(Path(url2pathname(urlparse(image.uri).path)).read_bytes())
        print(path.resolve(), flush=True)


class _Interrupts:
    """SIGINT while a command runs: the first sets `first`; the second quits at once."""

    def __init__(self) -> None:
        self.first = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def __enter__(self) -> _Interrupts:
        self._loop.add_signal_handler(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.remove_signal_handler(signal.SIGINT)

    def _on_sigint(self) -> None:
        if self.first.is_set():
            sys.stdout.flush()
            print("\ninterrupted again: quitting without waiting", file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)
        self.first.set()


async def run_submit(
    args: argparse.Namespace, settings: Settings, request: GenerationRequest
) -> int:
    """Send one request, show its progress, write its images. Ctrl-C cancels it."""
    from orchestrator.client import Client

    preview_dir: Path | None = args.preview_dir
    if preview_dir is not None:
        preview_dir.mkdir(parents=True, exist_ok=True)
    with _Interrupts() as interrupts:
        async with Client.from_settings(settings) as client:
            if interrupts.first.is_set():
                print("interrupted before the request was sent", file=sys.stderr)
                return EXIT_INTERRUPTED
            handle = await client.submit(request)
            rid = handle.request_id
            print(f"submitted {rid} to {settings.request_topic}", flush=True)
            display = ProgressDisplay(sys.stdout, rid, request.num_images)
            follower = asyncio.create_task(_follow(handle, display, preview_dir))
            try:
                answer = await _await_answer(args, handle, display, interrupts)
            finally:
                if not handle.answered:
                    follower.cancel()  # no answer: no terminal event to wait for
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    await asyncio.wait_for(follower, handle.grace_s + 2.0)
                display.end_line()
                handle.close()
    if isinstance(answer, int):
        return answer
    if answer.cancelled:
        if handle.cancel_sent:
            print(f"error: request {rid} cancelled (interrupted)", file=sys.stderr)
            return EXIT_INTERRUPTED
        print(f"error: request {rid} was cancelled", file=sys.stderr)
        return EXIT_CANCELLED
    if answer.result is None:
        print(f"error: request {rid} failed: {answer.reason}", file=sys.stderr)
        return EXIT_FAILED
    _write_images(answer, args.out)
    return EXIT_OK


async def _await_answer(
    args: argparse.Namespace, handle: JobHandle, display: ProgressDisplay, interrupts: _Interrupts
) -> Answer | int:
    """The answer, or an exit code: no answer in `--timeout`, or interrupted and no answer to
    the cancel in `--cancel-timeout`."""
    rid = handle.request_id
    start = time.monotonic()
    answer = asyncio.ensure_future(handle.result())
    interrupted = asyncio.ensure_future(interrupts.first.wait())
    try:
        while not answer.done():
            await asyncio.wait({answer, interrupted}, timeout=2.0, return_when="FIRST_COMPLETED")
            if answer.done():
                break
            if interrupted.done():
                display.note(
                    f"cancelling {rid}: waiting up to {args.cancel_timeout:.0f} s for the "
                    "cancelled answer (Ctrl-C again to quit now)",
                    err=True,
                )
                await handle.cancel(reason="interrupted by the user (orchestrator submit)")
                try:
                    return await asyncio.wait_for(asyncio.shield(answer), args.cancel_timeout)
                except TimeoutError:
                    display.note(
                        f"error: no answer to the cancel of {rid} after "
                        f"{args.cancel_timeout:.0f} s; it may still run",
                        err=True,
                    )
                    return EXIT_INTERRUPTED
            waited = time.monotonic() - start
            if waited >= args.timeout:
                display.note(f"error: no answer for {rid} after {args.timeout:.0f} s", err=True)
                return EXIT_NO_ANSWER
            if display.shown == 0:
                display.note(f"waiting for {rid}: {waited:.0f} s")
        return answer.result()
    finally:
        interrupted.cancel()
        if not answer.done():
            answer.cancel()


# -- cancel and watch -----------------------------------------------------------------------------


async def run_cancel(args: argparse.Namespace, settings: Settings) -> int:
    """Produce a cancel for a request; with `--wait`, wait for its answer."""
    from orchestrator.client import Client

    rid: str = args.request_id
    async with Client.from_settings(settings) as client:
        handle = client.watch(rid)
        try:
            await handle.cancel(args.reason)
            print(f"cancel of {rid} sent to {settings.control_topic}", flush=True)
            if not args.wait:
                return EXIT_OK
            try:
                answer = await handle.result(args.timeout)
            except TimeoutError:
                print(
                    f"error: no answer for {rid} after {args.timeout:.0f} s (unknown or already "
                    "answered requests are not answered again)",
                    file=sys.stderr,
                )
                return EXIT_NO_ANSWER
        finally:
            handle.close()
    if answer.cancelled:
        print(f"{rid} cancelled", flush=True)
        return EXIT_OK
    outcome = "finished" if answer.ok else f"failed ({answer.reason})"
    print(f"error: {rid} was not cancelled: it {outcome} first", file=sys.stderr)
    return EXIT_FAILED


async def run_watch(args: argparse.Namespace, settings: Settings) -> int:
    """Print a request's events from now on, until the terminal one."""
    from orchestrator.client import Client

    rid: str = args.request_id
    display = ProgressDisplay(sys.stdout, rid)
    display.tty = False  # one line per event: watch output is read as a log
    with _Interrupts() as interrupts:
        async with Client.from_settings(settings) as client:
            handle = client.watch(rid)
            # on stderr, so --json output stays JSON lines; from here on nothing is missed
            print(
                f"watching {rid} on {settings.progress_topic} (and its answer)",
                file=sys.stderr,
                flush=True,
            )
            follow = asyncio.ensure_future(_watch(handle, display, args.json))
            interrupted = asyncio.ensure_future(interrupts.first.wait())
            timeout = args.timeout or None
            try:
                done, _ = await asyncio.wait(
                    {follow, interrupted}, timeout=timeout, return_when="FIRST_COMPLETED"
                )
            finally:
                follow.cancel()
                interrupted.cancel()
                handle.close()
            if interrupted in done:
                return EXIT_INTERRUPTED
            if follow not in done:
                print(f"error: {rid} did not end within {args.timeout:.0f} s", file=sys.stderr)
                return EXIT_NO_ANSWER
            last = follow.result()
    if last.event == JobEvent.FINISHED:
        return EXIT_OK
    return EXIT_CANCELLED if last.event == JobEvent.CANCELLED else EXIT_FAILED


async def _watch(handle: JobHandle, display: ProgressDisplay, as_json: bool) -> ProgressEventRecord:
    last: ProgressEventRecord | None = None
    async for event in handle:
        last = event
        if as_json:
            print(event_json(event), flush=True)
        else:
            display.show(event)
    assert last is not None  # the iteration ends with a terminal event
    return last
