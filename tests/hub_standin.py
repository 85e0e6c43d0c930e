"""A stand-in for the Hugging Face hub's HTTP endpoint, serving local directories as model repositories.

Enough of the hub's API for ``huggingface_hub.snapshot_download`` (repository
info, the file tree, file downloads with the commit and ETag headers), so a
process started with ``HF_ENDPOINT=<url>`` downloads from it exactly as from
the hub: the launcher's and quantize's own code paths, no monkeypatching.
Every file request is recorded, so a test can say which files were fetched.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "a" * 40


class HubStandIn:
    """``repos``: repository id -> local directory; ``url`` once started."""

    def __init__(self) -> None:
        self.repos: dict[str, Path] = {}
        self.downloads: list[str] = []  # "repo/file" of every file body sent
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> HubStandIn:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _files(self, repo: str) -> list[Path]:
        return sorted(p for p in self.repos[repo].iterdir() if p.is_file())

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _json(self, payload, status: int = 200) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if status == 404:
                    self.send_header("X-Error-Code", "RepoNotFound")
                self.end_headers()
                self.wfile.write(body)

            def _repo(self, parts: list[str]) -> str | None:
                repo = "/".join(parts[:2])
                return repo if repo in hub.repos else None

            def do_HEAD(self) -> None:
                self._file(send_body=False)

            def do_GET(self) -> None:
                path = unquote(urlparse(self.path).path)
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"]:
                    repo = self._repo(parts[2:])
                    if repo is None:
                        self._json({"error": "Repository not found"}, 404)
                        return
                    rest = parts[4:]
                    if rest[:1] == ["revision"]:
                        self._json({"id": repo, "modelId": repo, "sha": COMMIT,
                                    "siblings": [{"rfilename": p.name} for p in hub._files(repo)]})
                        return
                    if rest[:1] == ["tree"]:
                        self._json([
                            {"type": "file", "path": p.name, "size": p.stat().st_size,
                             "oid": hashlib.sha1(p.read_bytes()).hexdigest()}
                            for p in hub._files(repo)
                        ])
                        return
                    self._json({"error": "not found"}, 404)
                    return
                self._file(send_body=True)

            def _file(self, send_body: bool) -> None:
                # /{org}/{name}/resolve/{revision}/{filename}
                parts = unquote(urlparse(self.path).path).strip("/").split("/")
                repo = self._repo(parts)
                if repo is None or parts[2:3] != ["resolve"] or len(parts) < 5:
                    self._json({"error": "Repository not found"}, 404)
                    return
                target = hub.repos[repo] / "/".join(parts[4:])
                if not target.is_file():
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = target.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                self.end_headers()
                if send_body:
                    hub.downloads.append(f"{repo}/{target.name}")
                    self.wfile.write(data)

        return Handler
