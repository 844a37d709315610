"""A small Hugging Face Hub-compatible HTTP server for tests, on 127.0.0.1, standard library only.

It speaks the subset of the Hub's HTTP protocol that `huggingface_hub` (2.4) uses to create model repos, commit
files and download them, so the unmodified client (and diffusers above it) is what the Hub tests exercise:

    POST /api/repos/create                                    create a model repo (409 + url if it exists)
    POST /api/validate-yaml                                   README.md metadata check (always valid here)
    POST /api/models/{ns}/{name}/preupload/{rev}              every file is uploaded "regular" (inline, base64)
    POST /api/models/{ns}/{name}/commit/{rev}                 ndjson: header, file, deletedFile, deletedFolder
    GET  /api/models/{ns}/{name}[/revision/{rev}]             model info: sha + siblings
    GET  /api/models/{ns}/{name}/tree/{rev}[/{path}]          file listing (?recursive=true)
    HEAD/GET /{ns}/{name}/resolve/{rev}/{path}                file content with ETag, X-Repo-Commit, Range

Every commit gets a new 40-hex id and keeps its own file map, so a commit id keeps serving the files it had.
Errors carry the `X-Error-Code` header the client turns into typed exceptions (RepoNotFound, RevisionNotFound,
EntryNotFound). A server started with a token answers 401 "Invalid credentials in Authorization header" to any
other bearer token, and to unauthenticated writes, as the Hub does. Only the `main` branch exists; LFS, Xet,
pull requests, tags and dataset/space repos are not implemented (a client never asks for LFS because preupload
answers "regular").

State lives in `data_dir`: blobs by sha256 under `blobs/`, and repos, branches and per-commit file maps in
`state.json`, so a server restarted on the same folder serves the same repos.

Run it by hand with `python tests/hub/hub_server.py --data-dir /tmp/hub --port 8765 [--token TOKEN]`, then
`HF_ENDPOINT=http://127.0.0.1:8765 HF_TOKEN=TOKEN HF_HOME=/tmp/hf-home ...`.
"""

import argparse
import base64
import hashlib
import json
import os
import re
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit


INITIAL_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob, which the Hub uses as the ETag and tree `oid` of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, repo_commit: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.repo_commit = repo_commit


class HubStore:
    """Repos, commits and blobs. All methods are called with `lock` held by the request handler."""

    def __init__(self, data_dir: str | os.PathLike):
        self.data_dir = Path(data_dir)
        self.blob_dir = self.data_dir / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.data_dir / "state.json"
        self.lock = threading.Lock()
        # {repo_id: {"branches": {name: commit_id}, "commits": {commit_id: {"parent", "summary", "date", "files"}}}}
        # where "files" maps a path to {"sha256", "size", "git_oid"}.
        self.repos = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}

    def save(self):
        # Written to a temporary name and renamed, so a reader never sees half a state file.
        temporary_path = self.state_path.with_suffix(".json.tmp")
        temporary_path.write_text(json.dumps(self.repos, indent=1))
        os.replace(temporary_path, self.state_path)

    def put_blob(self, content: bytes) -> dict:
        sha256 = hashlib.sha256(content).hexdigest()
        blob_path = self.blob_dir / sha256
        if not blob_path.exists():
            blob_path.write_bytes(content)
        return {"sha256": sha256, "size": len(content), "git_oid": git_blob_oid(content)}

    def read_blob(self, entry: dict) -> bytes:
        return (self.blob_dir / entry["sha256"]).read_bytes()

    def repo(self, repo_id: str) -> dict:
        if repo_id not in self.repos:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return self.repos[repo_id]

    def resolve(self, repo_id: str, revision: str) -> str:
        """A branch name or a full commit id -> commit id."""
        repo = self.repo(repo_id)
        if revision in repo["branches"]:
            return repo["branches"][revision]
        if revision in repo["commits"]:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def files(self, repo_id: str, commit_id: str) -> dict:
        return self.repos[repo_id]["commits"][commit_id]["files"]

    def create_repo(self, repo_id: str) -> bool:
        """Create the repo with an initial commit holding `.gitattributes`, as the Hub does. False if it exists."""
        if repo_id in self.repos:
            return False
        self.repos[repo_id] = {"branches": {}, "commits": {}}
        self.commit(repo_id, "main", "initial commit", {".gitattributes": self.put_blob(INITIAL_GITATTRIBUTES)}, [])
        return True

    def commit(self, repo_id: str, branch: str, summary: str, additions: dict, deletions: list[tuple[str, str]]):
        repo = self.repos[repo_id]
        parent = repo["branches"].get(branch)
        files = dict(repo["commits"][parent]["files"]) if parent is not None else {}
        for kind, path in deletions:
            if kind == "deletedFile":
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
            else:
                folder_files = [name for name in files if name.startswith(path.rstrip("/") + "/")]
                if not folder_files:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for name in folder_files:
                    del files[name]
        files.update(additions)
        date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        # Like a git commit id: a hash over parent, message, time and tree, so every commit gets a new one.
        tree = sorted((path, entry["sha256"]) for path, entry in files.items())
        fingerprint = json.dumps([parent, summary, time.time_ns(), tree])
        commit_id = hashlib.sha1(fingerprint.encode()).hexdigest()
        repo["commits"][commit_id] = {"parent": parent, "summary": summary, "date": date, "files": files}
        repo["branches"][branch] = commit_id
        self.save()
        return commit_id


class HubRequestHandler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so a stopped server cannot keep answering on a pooled connection.
    protocol_version = "HTTP/1.0"
    server_version = "SculptdiffTestHub/1.0"

    ROUTES = [
        ("POST", re.compile(r"/api/repos/create"), "create_repo"),
        ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
        ("POST", re.compile(r"/api/models/([^/]+)/([^/]+)/preupload/([^/]+)"), "preupload"),
        ("POST", re.compile(r"/api/models/([^/]+)/([^/]+)/commit/([^/]+)"), "commit"),
        ("GET", re.compile(r"/api/models/([^/]+)/([^/]+)/tree/([^/]+)(?:/(.+))?"), "tree"),
        ("GET", re.compile(r"/api/models/([^/]+)/([^/]+)(?:/revision/([^/]+))?"), "model_info"),
        ("GET", re.compile(r"/([^/]+)/([^/]+)/resolve/([^/]+)/(.+)"), "resolve"),
        ("HEAD", re.compile(r"/([^/]+)/([^/]+)/resolve/([^/]+)/(.+)"), "resolve"),
    ]
    WRITE_ACTIONS = {"create_repo", "preupload", "commit"}

    @property
    def store(self) -> HubStore:
        return self.server.store

    @property
    def endpoint(self) -> str:
        return f"http://{self.headers['Host']}"

    def log_message(self, format, *args):
        # Quiet by default: tests read errors from the client, not from the server's access log.
        if self.server.verbose:
            super().log_message(format, *args)

    def do_GET(self):
        self.dispatch()

    def do_HEAD(self):
        self.dispatch()

    def do_POST(self):
        self.dispatch()

    def dispatch(self):
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        # Read the whole body first: closing a connection with unread data makes the client see a reset, not the error.
        self.body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            for method, pattern, action in self.ROUTES:
                match = pattern.fullmatch(url.path)
                if method == self.command and match is not None:
                    self.check_token(write=action in self.WRITE_ACTIONS)
                    # Repo ids arrive as two plain segments; revisions and tree paths are percent-encoded.
                    arguments = [unquote(group) if group is not None else None for group in match.groups()]
                    with self.store.lock:
                        getattr(self, action)(*arguments)
                    return
            raise HubError(404, f"{self.command} {url.path} is not served by this test Hub")
        except HubError as error:
            headers = {"X-Error-Message": error.message}
            if error.error_code is not None:
                headers["X-Error-Code"] = error.error_code
            if error.repo_commit is not None:
                headers["X-Repo-Commit"] = error.repo_commit
            self.send_json({"error": error.message}, status=error.status, headers=headers)

    def check_token(self, write: bool):
        token = self.server.token
        authorization = self.headers.get("Authorization")
        if token is None or (authorization is None and not write):
            return
        if authorization != f"Bearer {token}":
            raise HubError(401, "Invalid credentials in Authorization header")

    def send_json(self, payload, status: int = 200, headers: dict | None = None):
        self.send_bytes(json.dumps(payload).encode(), status, {"Content-Type": "application/json", **(headers or {})})

    def send_bytes(self, body: bytes, status: int = 200, headers: dict | None = None):
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    # Write path

    def create_repo(self):
        payload = json.loads(self.body)
        if payload.get("type", "model") != "model":
            raise HubError(400, "This test Hub only hosts model repos")
        if payload.get("organization") is None:
            raise HubError(400, "This test Hub has no user account: create the repo as 'namespace/name'")
        repo_id = f"{payload['organization']}/{payload['name']}"
        url = f"{self.endpoint}/{repo_id}"
        if not self.store.create_repo(repo_id):
            self.send_json({"error": "You already created this model repo", "url": url}, status=409)
            return
        self.send_json({"url": url, "name": repo_id})

    def validate_yaml(self):
        self.send_json({"errors": [], "warnings": []})

    def preupload(self, namespace: str, name: str, revision: str):
        repo_id = f"{namespace}/{name}"
        files = self.store.files(repo_id, self.store.resolve(repo_id, revision))
        payload = json.loads(self.body)
        answer = []
        for file in payload["files"]:
            remote = files.get(file["path"])
            answer.append(
                {
                    "path": file["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": remote["git_oid"] if remote is not None else None,
                }
            )
        self.send_json({"files": answer})

    def commit(self, namespace: str, name: str, revision: str):
        repo_id = f"{namespace}/{name}"
        repo = self.store.repo(repo_id)
        self.store.resolve(repo_id, revision)
        if "create_pr" in self.query:
            raise HubError(400, "This test Hub does not implement pull requests")
        if revision not in repo["branches"]:
            raise HubError(400, f"Can only commit to a branch, not to {revision}")
        summary = ""
        additions = {}
        deletions = []
        for line in self.body.splitlines():
            operation = json.loads(line)
            key, value = operation["key"], operation["value"]
            if key == "header":
                summary = value["summary"]
            elif key == "file" and value.get("encoding") == "base64":
                additions[value["path"]] = self.store.put_blob(base64.b64decode(value["content"]))
            elif key in ("deletedFile", "deletedFolder"):
                deletions.append((key, value["path"]))
            else:
                raise HubError(400, f"This test Hub does not implement commit operation {key!r}")
        commit_id = self.store.commit(repo_id, revision, summary, additions, deletions)
        self.send_json(
            {
                "success": True,
                "commitOid": commit_id,
                "commitUrl": f"{self.endpoint}/{repo_id}/commit/{commit_id}",
                "pullRequestUrl": None,
            }
        )

    # Read path

    def model_info(self, namespace: str, name: str, revision: str | None):
        repo_id = f"{namespace}/{name}"
        commit_id = self.store.resolve(repo_id, revision or "main")
        commit = self.store.repos[repo_id]["commits"][commit_id]
        siblings = [
            {"rfilename": path, "size": entry["size"], "blobId": entry["git_oid"]}
            for path, entry in sorted(commit["files"].items())
        ]
        self.send_json(
            {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": namespace,
                "sha": commit_id,
                "lastModified": commit["date"],
                "private": False,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
            }
        )

    def tree(self, namespace: str, name: str, revision: str, folder: str | None):
        repo_id = f"{namespace}/{name}"
        commit_id = self.store.resolve(repo_id, revision)
        files = self.store.files(repo_id, commit_id)
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = folder.strip("/") + "/" if folder else ""
        entries = {}
        for path, entry in files.items():
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            # Every folder on the way to the file, down to the first level only when not recursive.
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folder_path = prefix + "/".join(parts[:depth])
                folder_oid = hashlib.sha1(f"{commit_id}:{folder_path}".encode()).hexdigest()
                entries[folder_path] = {"type": "directory", "oid": folder_oid, "size": 0, "path": folder_path}
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "oid": entry["git_oid"], "size": entry["size"], "path": path}
        if prefix and not entries:
            raise HubError(404, f"{folder} does not exist on {revision}", "EntryNotFound", repo_commit=commit_id)
        self.send_json([entries[path] for path in sorted(entries)])

    def resolve(self, namespace: str, name: str, revision: str, path: str):
        repo_id = f"{namespace}/{name}"
        commit_id = self.store.resolve(repo_id, revision)
        entry = self.store.files(repo_id, commit_id).get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", repo_commit=commit_id)
        content = self.store.read_blob(entry)
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{entry["git_oid"]}"',
            "X-Repo-Commit": commit_id,
            "Accept-Ranges": "bytes",
        }
        range_header = self.headers.get("Range")
        if range_header is None:
            self.send_bytes(content, headers=headers)
            return
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header)
        if match is None or int(match.group(1)) >= max(len(content), 1):
            raise HubError(416, f"Range not satisfiable: {range_header}")
        start = int(match.group(1))
        end = min(int(match.group(2)), len(content) - 1) if match.group(2) else len(content) - 1
        headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
        self.send_bytes(content[start : end + 1], status=206, headers=headers)


class HubServer(ThreadingHTTPServer):
    """`HubServer(data_dir).start()` serves on a free port of 127.0.0.1 from a daemon thread; `.url`, `.stop()`."""

    daemon_threads = True

    def __init__(self, data_dir: str | os.PathLike, token: str | None = None, port: int = 0, verbose: bool = False):
        super().__init__(("127.0.0.1", port), HubRequestHandler)
        self.store = HubStore(data_dir)
        self.token = token
        self.verbose = verbose
        self.thread = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        # A short poll interval makes stop() quick (shutdown waits for the next poll).
        self.thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.1}, name="test-hub", daemon=True
        )
        self.thread.start()
        return self

    def stop(self):
        """Stop serving and close the listening socket: new connections are refused from now on."""
        self.shutdown()
        self.server_close()
        self.thread.join()


def main():
    parser = argparse.ArgumentParser(description="Serve a Hugging Face Hub-compatible test Hub on 127.0.0.1.")
    parser.add_argument("--data-dir", required=True, help="Folder for blobs and state.json (created if missing).")
    parser.add_argument("--port", type=int, default=0, help="Port on 127.0.0.1; 0 picks a free one.")
    parser.add_argument("--token", default=None, help="If set, other bearer tokens and anonymous writes get 401.")
    parser.add_argument("--verbose", action="store_true", help="Print the access log.")
    args = parser.parse_args()
    server = HubServer(args.data_dir, token=args.token, port=args.port, verbose=args.verbose)
    print(f"HF_ENDPOINT={server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.server_close()


if __name__ == "__main__":
    main()
