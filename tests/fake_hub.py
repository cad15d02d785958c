"""A local stand-in for the Hugging Face Hub: repositories served on 127.0.0.1 in the Hub's URL layout.

``/{repo}/resolve/{revision}/{file}`` answers HEAD and GET with the headers ``huggingface_hub``
reads (``X-Repo-Commit``, ``ETag``, and for LFS files ``X-Linked-Etag`` = the sha256 and
``X-Linked-Size``), ``/api/models/{repo}/revision/{revision}`` with the repository's file list
and LFS metadata, and unknown repositories, revisions and files with the Hub's error codes.
A tampered file is served with other bytes under its true sha256, as a corrupted mirror would.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
import urllib.parse

LFS_SUFFIXES = (".safetensors", ".bin")


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.tampered: set[tuple[str, str]] = set()
        self.requests: list[str] = []
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def add(self, repo_id: str, files: dict[str, bytes]) -> str:
        """Publishes a repository; returns its commit hash."""
        commit = hashlib.sha1(repo_id.encode() + b"".join(sorted(files.values()))).hexdigest()
        self.repos[repo_id] = {"commit": commit, "files": dict(files)}
        return commit

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def lookup(self, repo_id: str, revision: str) -> tuple[int, dict, dict | None]:
        """(status, error headers, repository) for a repository at a revision."""
        repo = self.repos.get(repo_id)
        if repo is None:
            return 404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, None
        if revision not in ("main", repo["commit"]):
            return 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"}, None
        return 200, {}, repo


def _lfs(data: bytes) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}


def _handler(hub: FakeHub):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, status: int, headers: dict, body: bytes = b"") -> None:
            self.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)

        def _api(self, repo_id: str, revision: str) -> None:
            status, errors, repo = hub.lookup(repo_id, revision)
            if repo is None:
                return self._send(status, errors)
            siblings = [{"rfilename": f, "size": len(d), **({"lfs": _lfs(d)} if f.endswith(LFS_SUFFIXES) else {})}
                        for f, d in sorted(repo["files"].items())]
            body = json.dumps({"id": repo_id, "sha": repo["commit"], "siblings": siblings}).encode()
            self._send(200, {"Content-Type": "application/json"}, body)

        def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
            status, errors, repo = hub.lookup(repo_id, revision)
            if repo is None:
                return self._send(status, errors)
            if filename not in repo["files"]:
                return self._send(404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found",
                                        "X-Repo-Commit": repo["commit"]})
            data = repo["files"][filename]
            headers = {"X-Repo-Commit": repo["commit"], "Accept-Ranges": "bytes"}
            if filename.endswith(LFS_SUFFIXES):
                sha = _lfs(data)["sha256"]
                headers.update({"ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))})
            else:
                headers["ETag"] = '"' + hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() + '"'
            if (repo_id, filename) in hub.tampered:
                data = bytes([data[0] ^ 1]) + data[1:]  # same size, same advertised sha256, other bytes
            self._send(200, headers, data)

        def _route(self) -> None:
            path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
            hub.requests.append(f"{self.command} {path}")
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/(.+)", path):
                return self._api(m[1], m[2])
            if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                return self._resolve(m[1], m[2], m[3])
            self._send(404, {"X-Error-Message": "not found"})

        do_GET = do_HEAD = _route

    return Handler
