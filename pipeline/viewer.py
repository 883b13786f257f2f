"""Offline browser viewer for a debug dump: `python -m pipeline.viewer DIR [--port P] [--no-browser]`.

Serves, on 127.0.0.1 only, the page in pipeline/viewer_static/ and the dump behind a small JSON API:
    GET /                   the page            GET /static/<file>   its JS/CSS
    GET /api/manifest       manifest + warnings GET /api/frames?offset=&limit=   frame records, paged
    GET /images/<file>      dumped images (plain names inside DIR/images only; no path traversal)

A render with overwrite=true into the same folder rewrites the dump under the same names. So the dump is read
again when its manifest or frames file changes, and images are revalidated on every use (an ETag and Last-Modified
from the file's mtime and size, 304 when they still match): a cached copy, or the records read at start, would show
one render's pictures beside another's records.
"""
from __future__ import annotations

import argparse
import email.utils
import json
import os
import sys
import threading
import webbrowser
from dataclasses import replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from common.errors import one_line
from common.signals import on_stop_signals
from pipeline.debug_format import FRAMES, IMAGE_NAME, IMAGES, MANIFEST, DebugDumpError
from pipeline.debug_reader import Dump, load_dump

STATIC = Path(__file__).with_name("viewer_static")
STATIC_FILES = {"index.html": "text/html", "viewer.js": "text/javascript", "viewer.css": "text/css"}
IMAGE_TYPES = {".jpg": "image/jpeg", ".png": "image/png"}
MAX_PAGE = 2000


class ViewerHandler(BaseHTTPRequestHandler):
    server: "ViewerServer"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        url = urlparse(self.path)
        path = url.path
        if path in ("/", "/index.html"):
            self._send_file(STATIC / "index.html", "text/html")
        elif path.startswith("/static/") and path[len("/static/"):] in STATIC_FILES:
            name = path[len("/static/"):]
            self._send_file(STATIC / name, STATIC_FILES[name])
        elif path == "/api/manifest":
            dump = self.server.dump
            self._send_json({**dump.manifest, "warnings": dump.warnings, "dir": str(dump.dir)})
        elif path == "/api/frames":
            self._send_frames(parse_qs(url.query))
        elif path.startswith(f"/{IMAGES}/"):
            self._send_image(path[len(f"/{IMAGES}/"):])
        elif path == "/favicon.ico":
            self._send(b"", "image/x-icon")
        else:
            self.send_error(HTTPStatus.NOT_FOUND, "not found")

    def do_HEAD(self) -> None:  # noqa: N802 (http.server's name): GET's status and headers (curl -I), no body
        self.do_GET()

    def _send_frames(self, query: dict) -> None:
        frames = self.server.dump.frames
        try:
            offset = max(0, int(query.get("offset", ["0"])[0]))
            limit = min(MAX_PAGE, max(1, int(query.get("limit", [str(MAX_PAGE)])[0])))
        except ValueError:
            self.send_error(HTTPStatus.BAD_REQUEST, "offset and limit must be integers")
            return
        page = frames[offset:offset + limit]
        body = (f'{{"total":{len(frames)},"offset":{offset},"frames":[' + ",".join(page) + "]}").encode("utf-8")
        self._send(body, "application/json")

    def _send_image(self, name: str) -> None:
        # Only names the dumper writes; anything with a slash, '..' or an odd name never touches the disk.
        if not IMAGE_NAME.match(name):
            self.send_error(HTTPStatus.NOT_FOUND, "not found")
            return
        path = self.server.dump.dir / IMAGES / name
        if not path.is_file():
            self.send_error(HTTPStatus.NOT_FOUND, "image missing")
            return
        self._send_file(path, IMAGE_TYPES[path.suffix], validate=True)

    def _send_json(self, value: object) -> None:
        self._send(json.dumps(value, allow_nan=False).encode("utf-8"), "application/json")

    def _send_file(self, path: Path, content_type: str, validate: bool = False) -> None:
        """`validate`: cacheable, but only after asking whether the file changed (see the module's docstring)."""
        try:
            with open(path, "rb") as f:
                # the open file's own stat: the validator belongs to the bytes sent, even while a render renames a
                # new image into place
                stat = os.fstat(f.fileno())
                tag = f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"'
                tags = _entity_tags(self.headers.get("If-None-Match")) if validate else set()
                body = None if tag in tags or "*" in tags else f.read()
        except OSError:
            self.send_error(HTTPStatus.NOT_FOUND, "not found")
            return
        if not validate:
            self._send(body, content_type)
            return
        headers = {"ETag": tag, "Last-Modified": email.utils.formatdate(stat.st_mtime, usegmt=True)}
        if body is None:
            self.send_response(HTTPStatus.NOT_MODIFIED)
            for key, value in {**headers, "Cache-Control": "no-cache"}.items():
                self.send_header(key, value)
            self.end_headers()
            return
        self._send(body, content_type, headers)

    def _send(self, body: bytes, content_type: str, validators: dict[str, str] | None = None) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type + ("; charset=utf-8" if not content_type.startswith("image") else ""))
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache" if validators else "no-store")
        for key, value in (validators or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        if self.server.verbose:
            super().log_message(format, *args)


def _entity_tags(header: str | None) -> set[str]:
    """The tags of an If-None-Match header (weak ones as their strong form: a GET compares weakly)."""
    if not header:
        return set()
    return {tag.strip().removeprefix("W/") for tag in header.split(",")}


class ViewerServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, dump: Dump, port: int = 0, verbose: bool = False):
        self._dump, self._stamp, self._lock = dump, _stamp(dump.dir), threading.Lock()
        self.verbose = verbose
        super().__init__(("127.0.0.1", port), ViewerHandler)

    def handle_error(self, request, client_address) -> None:
        """A browser that drops a download it no longer wants (playing, or stepping fast) is no error: the default
        printed a traceback for each; any other error still prints one."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    @property
    def dump(self) -> Dump:
        """The dump as it is on disk: read again once its manifest or frames file changed (a render into the same
        folder replaces them, and the page reloaded would show the new images with the old records); where the new
        one cannot be read yet, the last one with a warning."""
        with self._lock:
            stamp = _stamp(self._dump.dir)
            if stamp == self._stamp:
                return self._dump
            try:
                dump = load_dump(self._dump.dir)
            except (DebugDumpError, OSError) as e:
                return replace(self._dump, warnings=[*self._dump.warnings, f"the dump changed on disk and cannot be "
                                                     f"read now ({one_line(e)}): showing it as it was"])
            self._dump, self._stamp = dump, stamp
            print(f"note: {dump.dir} changed on disk: read again ({len(dump.frames)} frames)", file=sys.stderr,
                  flush=True)
            return dump

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def start_in_thread(self) -> threading.Thread:
        """For tests and embedding: serve until `shutdown()`."""
        thread = threading.Thread(target=self.serve_forever, name="debug-viewer", daemon=True)
        thread.start()
        return thread


def _stamp(directory: Path) -> tuple:
    """What changes when a render writes the dump again: its manifest's and frames file's identity, time and size."""
    def identity(path: Path) -> tuple | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        return stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size
    return identity(directory / MANIFEST), identity(directory / FRAMES)


def _has_browser() -> bool:
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False
    try:
        webbrowser.get()
    except webbrowser.Error:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.viewer", description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="debug dump folder (written by pipeline.render debug.dump=true)")
    parser.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0 = any free port)")
    parser.add_argument("--no-browser", action="store_true", help="only print the URL")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:   # bind() would raise OverflowError, not the OSError handled below
        print(f"error: --port must be 0-65535 (0 = any free port), not {args.port}", file=sys.stderr)
        return 2
    try:
        dump = load_dump(args.dir)
    except DebugDumpError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:   # the reader names the files it reads; this is for whatever else the disk refuses
        print(f"error: cannot read debug dump {e.filename or args.dir}: {e.strerror or e}", file=sys.stderr)
        return 2
    try:
        server = ViewerServer(dump, args.port, args.verbose)
    except OSError as e:
        print(f"error: cannot listen on 127.0.0.1:{args.port}: {e.strerror or e} (try --port 0)", file=sys.stderr)
        return 2
    for warning in dump.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    # `kill`, and a closed terminal (SIGHUP killed it without a word), stop it as cleanly as Ctrl-C: its normal end
    on_stop_signals()
    try:   # from the line that says Ctrl-C stops, through a browser start that can take seconds
        print(f"debug viewer for {dump.dir} ({len(dump.frames)} frames) at {server.url}  (Ctrl-C stops)", flush=True)
        if not args.no_browser and _has_browser():
            webbrowser.open(server.url)
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
