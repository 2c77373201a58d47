"""A small, real HTTP server that speaks enough of the Hugging Face Hub API for the real clients to run against it
offline: `huggingface_hub` (2.x, with `HF_HUB_DISABLE_XET=1`), `datasets` (`push_to_hub`, `load_dataset`) and
`transformers` (`from_pretrained`, `pipeline`). Standard library only.

    with HubServer() as hub:
        env = hub.client_env(hf_home)          # HF_ENDPOINT, HF_HOME, HF_TOKEN, HF_HUB_DISABLE_XET for a subprocess
        subprocess.run([...], env=env)
        hub.fail_with = 500                    # every request now answers 500 ...
        hub.fail_with = None                   # ... until switched off
        hub.inject_failures(500, count=1, path=r"/api/repos/create")   # only the next matching request fails
        hub.stop()                             # refuses connections (and drops open keep-alive ones)
        hub.start()                            # back, on the same port, with the same repositories

What it implements, trimmed to what the tests' clients call (model and dataset repositories only):
- `GET /api/whoami-v2`, `POST /api/repos/create` (409 with the repo URL when it exists), `POST /api/validate-yaml`;
- `GET /api/{models,datasets}/{id}[/revision/{rev}]` (repo_info, with `siblings`, `sha`, `cardData`),
  `.../tree/{rev}[/{path}]` (recursive or not, paginated with a `Link` header), `POST .../paths-info/{rev}`
  (form-encoded, with `expand` for `lastCommit`), `GET .../commits/{rev}`, `GET .../refs`, `POST .../branch/{name}`,
  `POST .../tag/{rev}`;
- uploads: `POST .../preupload/{rev}` (regular or LFS by size, binary content or `.gitattributes` pattern, and the
  remote oid so unchanged files are skipped), the LFS batch API `POST /{prefix}{id}.git/info/lfs/objects/batch`
  (basic transfer: a `PUT` of the bytes and a verify call), and `POST .../commit/{rev}` (NDJSON: base64 `file`,
  `lfsFile` and `deletedFile` lines) to a branch, honouring `parentCommit` (412 when stale);
- downloads: `HEAD`/`GET /{prefix}{id}/resolve/{rev}/{path}` with `ETag`, `X-Repo-Commit`, `X-Linked-Etag`,
  `X-Linked-Size`, `Accept-Ranges` and single `Range` requests (206 / 416).

Every commit is a real revision: it has its own sha, keeps its own tree, and moves its branch; any branch, tag, full
commit sha or unambiguous sha prefix resolves. Blobs are kept, content-addressed by sha256, in a temporary folder.
Errors carry `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`) as the Hub's do, so the clients raise
their usual exceptions. Writes need a known token (`HubServer.token`, sent as `Authorization: Bearer ...`); public
repositories can be read anonymously.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

REPO_TYPES = {"models": "model", "datasets": "dataset"}
URL_PREFIXES = {"model": "", "dataset": "datasets/"}
LFS_CONTENT_TYPE = "application/vnd.git-lfs+json"
# The Hub's default `.gitattributes` (abridged): files matching these go to LFS.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*", "*.mlmodel",
        "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt",
        "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm",
        "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)
DATASET_GITATTRIBUTES_EXTRA = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in ("*.jpg", "*.jpeg", "*.png", "*.webp", "*.mp3", "*.wav", "*.flac", "*.ogg", "*.mp4")
)


def run_python(code: str, env: dict, *args: str, cwd: str | Path | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter (the clients read `HF_ENDPOINT` & co. at import, so they must start after
    the environment is set). A non-zero exit fails with the end of its stderr."""
    completed = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=cwd, capture_output=True, text=True,
                               timeout=timeout)
    if completed.returncode != 0:
        raise AssertionError(f"client process exited with {completed.returncode}:\n{completed.stderr[-6000:]}")
    return completed


def last_json_line(completed: subprocess.CompletedProcess):
    """The JSON object a client script printed last on stdout."""
    for line in reversed(completed.stdout.strip().splitlines()):
        if line.startswith(("{", "[")):
            return json.loads(line)
    raise AssertionError(
        f"no JSON line in the client's output:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")


class HubError(Exception):
    """Turned into an HTTP error response; `code` becomes the `X-Error-Code` header."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}
        self.body = body


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _yaml_scalar(value: str):
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "~"):
        return None
    if re.fullmatch(r"-?\d+", value):
        return int(value)
    return value


def _is_true(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes")


class _Repo:
    def __init__(self, repo_type: str, repo_id: str, private: bool):
        self.repo_type, self.repo_id, self.private = repo_type, repo_id, private
        self.created_at = _now()
        self.branches: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.commits: dict[str, dict] = {}

    def refs(self) -> dict[str, str]:
        return {**self.tags, **self.branches}


class HubServer:
    """The server and its state. Usable as a context manager; `url` is valid once started."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0,
                 user: str = "user", token: str = "hf_local_test_token",
                 lfs_threshold: int = 10 * 1024 * 1024, page_size: int = 1000):
        self.host = host
        self.port = port
        self.user = user
        self.token = token
        self.lfs_threshold = lfs_threshold
        self.page_size = page_size
        self.root = Path(tempfile.mkdtemp(prefix="hub_server_"))
        self.blob_dir = self.root / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status), in order
        self.lock = threading.RLock()
        self._failures: list[dict] = []
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._commit_counter = 0

    # ----------------------------------------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("The server has not been started yet.")
        return f"http://{self.host}:{self.port}"

    def start(self) -> "HubServer":
        if self._httpd is not None:
            return self
        handler = type("BoundHubHandler", (_HubHandler,), {"hub": self})
        httpd = _ThreadingServer((self.host, self.port), handler)
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                                        name=f"hub-server-{self.port}")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops listening and drops open connections: clients then get connection errors. State is kept."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        with self.lock:
            connections, self._connections = list(self._connections), set()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ fault injection
    @property
    def fail_with(self) -> int | None:
        """Status every request is answered with (`None`: serve normally). Setting it replaces other injections."""
        with self.lock:
            for rule in self._failures:
                if rule["count"] is None and rule["path"] is None:
                    return rule["status"]
        return None

    @fail_with.setter
    def fail_with(self, status: int | None) -> None:
        with self.lock:
            rule = {"status": status, "count": None, "path": None}
            self._failures = [] if status is None else [rule]

    def inject_failures(self, status: int = 500, count: int | None = None, path: str | None = None) -> None:
        """Answer `status` to the next `count` requests (all of them if `None`) whose path matches the regex `path`
        (searched in the raw request path; any if `None`)."""
        with self.lock:
            self._failures.append({"status": status, "count": count, "path": re.compile(path) if path else None})

    def clear_failures(self) -> None:
        with self.lock:
            self._failures = []

    def _injected_failure(self, path: str) -> int | None:
        with self.lock:
            for rule in self._failures:
                if rule["path"] is not None and not rule["path"].search(path):
                    continue
                if rule["count"] is not None:
                    if rule["count"] <= 0:
                        continue
                    rule["count"] -= 1
                return rule["status"]
        return None

    # ------------------------------------------------------------------------------------------ client helpers
    def client_env(self, hf_home: str | Path) -> dict:
        """Environment for a subprocess running the real clients against this server, with the server's token."""
        env = dict(os.environ)
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN_PATH",
                     "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_MODULES_CACHE",
                     "TRANSFORMERS_CACHE", "HF_XET_CACHE", "HF_HUB_ENABLE_HF_TRANSFER"):
            env.pop(name, None)
        env.update({
            "HF_ENDPOINT": self.url,
            "HF_HOME": str(hf_home),
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
            "DO_NOT_TRACK": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_TOKEN": self.token,
        })
        return env

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self.lock:
            return (repo_type, repo_id) in self.repos

    def head(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> str:
        """The commit sha `revision` resolves to."""
        with self.lock:
            return self._resolve(self._repo(repo_type, repo_id), revision)

    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, dict]:
        """`path -> {"size", "sha256", "lfs", "oid"}` at `revision`."""
        with self.lock:
            repo = self._repo(repo_type, repo_id)
            return {path: dict(entry) for path, entry in repo.commits[self._resolve(repo, revision)]["tree"].items()}

    def read(self, repo_id: str, path: str, repo_type: str = "model", revision: str = "main") -> bytes:
        entry = self.files(repo_id, repo_type, revision)[path]
        return self._blob_path(entry["sha256"]).read_bytes()

    def commits(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> list[dict]:
        """The history of `revision`, newest first."""
        with self.lock:
            repo = self._repo(repo_type, repo_id)
            return [dict(commit, tree=None) for commit in self._history(repo, self._resolve(repo, revision))]

    # ------------------------------------------------------------------------------------------------ storage
    def _blob_path(self, sha256: str) -> Path:
        return self.blob_dir / sha256

    def _store_blob(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self._blob_path(sha256)
        if not path.exists():
            partial = path.with_name(f"{sha256}.{threading.get_ident()}.partial")
            partial.write_bytes(data)
            os.replace(partial, path)
        return sha256

    def _repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    def _resolve(self, repo: _Repo, revision: str | None) -> str:
        revision = revision or "main"
        refs = repo.refs()
        if revision in refs:
            return refs[revision]
        if revision in repo.commits:
            return revision
        if re.fullmatch(r"[0-9a-f]{7,40}", revision):
            matches = [sha for sha in repo.commits if sha.startswith(revision)]
            if len(matches) == 1:
                return matches[0]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _history(self, repo: _Repo, sha: str) -> list[dict]:
        history = []
        while sha is not None:
            commit = repo.commits[sha]
            history.append(commit)
            sha = commit["parents"][0] if commit["parents"] else None
        return history

    def _new_commit(self, repo: _Repo, parent: str | None, tree: dict, title: str, message: str) -> str:
        self._commit_counter += 1
        listing = json.dumps(sorted((path, entry["oid"]) for path, entry in tree.items()))
        seed = f"{repo.repo_type}/{repo.repo_id}\n{parent}\n{listing}\n{title}\n{message}\n{time.time_ns()}\n" \
               f"{self._commit_counter}"
        sha = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[sha] = {
            "id": sha, "parents": [parent] if parent else [], "tree": tree, "title": title, "message": message,
            "date": _now(), "author": self.user,
        }
        return sha

    def _entry(self, data: bytes, lfs: bool) -> dict:
        sha256 = self._store_blob(data)
        oid = git_blob_oid(lfs_pointer(sha256, len(data))) if lfs else git_blob_oid(data)
        return {"size": len(data), "sha256": sha256, "lfs": lfs, "oid": oid}

    def _lfs_patterns(self, repo: _Repo, tree: dict) -> list[str]:
        entry = tree.get(".gitattributes")
        if entry is None:
            return []
        patterns = []
        for line in self._blob_path(entry["sha256"]).read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 2 and "filter=lfs" in parts[1:]:
                patterns.append(parts[0])
        return patterns

    @staticmethod
    def _matches(path: str, pattern: str) -> bool:
        if "/" in pattern.strip("/"):
            return fnmatch.fnmatch(path, pattern.strip("/").replace("**/", "*"))
        return fnmatch.fnmatch(path.rsplit("/", 1)[-1], pattern)

    def _upload_mode(self, repo: _Repo, tree: dict, path: str, size: int, sample: bytes) -> str:
        if size >= self.lfs_threshold or b"\0" in sample:
            return "lfs"
        if any(self._matches(path, pattern) for pattern in self._lfs_patterns(repo, tree)):
            return "lfs"
        return "regular"

    # ------------------------------------------------------------------------------------------ JSON builders
    def _repo_url(self, repo: _Repo) -> str:
        return f"{self.url}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}"

    def _file_json(self, path: str, entry: dict, last_commit: dict | None = None) -> dict:
        item = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
        if entry["lfs"]:
            item["lfs"] = {"oid": entry["sha256"], "size": entry["size"],
                           "pointerSize": len(lfs_pointer(entry["sha256"], entry["size"]))}
        if last_commit is not None:
            item["lastCommit"] = last_commit
        return item

    def _folder_oid(self, tree: dict, folder: str) -> str:
        prefix = folder + "/"
        listing = json.dumps(sorted((p, e["oid"]) for p, e in tree.items() if p.startswith(prefix)))
        return hashlib.sha1(listing.encode()).hexdigest()

    def _folder_json(self, tree: dict, folder: str, last_commit: dict | None = None) -> dict:
        item = {"type": "directory", "oid": self._folder_oid(tree, folder), "size": 0, "path": folder}
        if last_commit is not None:
            item["lastCommit"] = last_commit
        return item

    def _last_commit(self, repo: _Repo, sha: str, path: str) -> dict:
        """The newest commit of `sha`'s history that changed `path` (a file or a folder)."""
        history = self._history(repo, sha)

        def state(commit):
            tree = commit["tree"]
            if path in tree:
                return tree[path]["oid"]
            return self._folder_oid(tree, path)

        chosen = history[0]
        for commit, older in zip(history, history[1:] + [None]):
            chosen = commit
            if older is None or state(older) != state(commit):
                break
        return {"id": chosen["id"], "title": chosen["title"], "date": chosen["date"]}

    @staticmethod
    def _folders(tree: dict) -> set[str]:
        folders = set()
        for path in tree:
            parts = path.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                folders.add("/".join(parts[:depth]))
        return folders

    def _card_data(self, tree: dict) -> dict | None:
        """The top-level scalars and lists of `README.md`'s YAML header (enough for `tags`, `library_name`,
        `pipeline_tag`, ...); nested mappings are skipped. Standard library only, so no YAML parser."""
        entry = tree.get("README.md")
        if entry is None:
            return None
        text = self._blob_path(entry["sha256"]).read_text(errors="replace")
        match = re.match(r"^---[ \t]*\n(.*?)\n---[ \t]*(\n|$)", text, re.S)
        if not match:
            return None
        data: dict = {}
        nested: set[str] = set()
        key = None
        for line in match.group(1).splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            top = re.match(r"^([A-Za-z0-9_.-]+):\s*(.*)$", line)
            if top:
                key, value = top.group(1), top.group(2).strip()
                data[key] = _yaml_scalar(value) if value else None
                continue
            if key is None:
                continue
            item = re.match(r"^\s*-\s+(.*)$", line)
            if item and key not in nested and (data[key] is None or isinstance(data[key], list)):
                data[key] = (data[key] or []) + [_yaml_scalar(item.group(1).strip())]
            else:
                nested.add(key)  # a nested mapping, or a list of them: left out
        data = {name: value for name, value in data.items() if name not in nested}
        return data

    def _info_json(self, repo: _Repo, sha: str, blobs: bool) -> dict:
        commit = repo.commits[sha]
        tree = commit["tree"]
        siblings = []
        for path in sorted(tree):
            sibling = {"rfilename": path}
            if blobs:
                entry = tree[path]
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if entry["lfs"]:
                    sibling["lfs"] = {"size": entry["size"], "sha256": entry["sha256"],
                                      "pointerSize": len(lfs_pointer(entry["sha256"], entry["size"]))}
            siblings.append(sibling)
        namespace = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
        card = self._card_data(tree)
        info = {
            "_id": hashlib.sha1(f"{repo.repo_type}/{repo.repo_id}".encode()).hexdigest()[:24],
            "id": repo.repo_id, "author": namespace, "sha": sha, "lastModified": commit["date"],
            "createdAt": repo.created_at, "private": repo.private, "gated": False, "disabled": False,
            "downloads": 0, "likes": 0, "tags": list((card or {}).get("tags") or []), "siblings": siblings,
            "usedStorage": sum(entry["size"] for entry in tree.values()),
        }
        if card is not None:
            info["cardData"] = card
        if repo.repo_type == "model":
            config_entry = tree.get("config.json")
            if config_entry is not None:
                try:
                    config = json.loads(self._blob_path(config_entry["sha256"]).read_bytes())
                    info["config"] = {key: config[key] for key in ("architectures", "model_type", "auto_map")
                                      if key in config}
                except ValueError:
                    pass
            if card:
                info["library_name"] = card.get("library_name")
                info["pipeline_tag"] = card.get("pipeline_tag")
        return info


class _ThreadingServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def server_bind(self):
        # `HTTPServer.server_bind` looks the host name up (`socket.getfqdn`): not needed for a loopback server.
        import socketserver

        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class _HubHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"
    timeout = 60
    hub: HubServer  # set on the bound subclass

    # -------------------------------------------------------------------------------------------- plumbing
    def setup(self):
        super().setup()
        with self.hub.lock:
            self.hub._connections.add(self.connection)

    def finish(self):
        with self.hub.lock:
            self.hub._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_length: int | None = None):
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/json; charset=utf-8")
        for name, value in headers.items():
            self.send_header(name, str(value))
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        with self.hub.lock:
            self.hub.requests.append((self.command, self.path, status))

    def _json(self, status: int, payload, headers: dict | None = None):
        self._send(status, json.dumps(payload).encode(), headers)

    def _error(self, error: HubError):
        headers = {"X-Error-Message": error.message.replace("\n", " ")[:500], **error.headers}
        if error.code:
            headers["X-Error-Code"] = error.code
        self._json(error.status, error.body if error.body is not None else {"error": error.message}, headers)

    def _handle(self):
        try:
            body = b"" if self.command == "HEAD" else self._read_body()
        except (OSError, ValueError):
            self.close_connection = True
            return
        self.body = body
        split = urlsplit(self.path)
        self.raw_path = split.path
        self.query = parse_qs(split.query, keep_blank_values=True)
        try:
            status = self.hub._injected_failure(self.raw_path)
            if status is not None:
                raise HubError(status, f"Injected failure ({status}) for {self.command} {self.raw_path}")
            self._route()
        except HubError as error:
            self._error(error)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as error:  # a bug in the server must show up as a 500, not as a hung client
            import traceback

            traceback.print_exc()
            self._error(HubError(500, f"Internal server error: {type(error).__name__}: {error}"))

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle

    # ------------------------------------------------------------------------------------------------ auth
    def _token(self) -> str | None:
        value = self.headers.get("Authorization") or ""
        return value[7:].strip() if value.lower().startswith("bearer ") else None

    def _require_token(self):
        token = self._token()
        if token is None:
            raise HubError(401, "You must be authenticated to access this resource.")
        if token != self.hub.token:
            raise HubError(401, "Invalid credentials in Authorization header")

    def _check_read(self, repo: _Repo):
        if repo.private and self._token() != self.hub.token:
            raise HubError(401, f"Repository not found: {repo.repo_id}", "RepoNotFound")

    def _param(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def _json_body(self) -> dict:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as error:
            raise HubError(400, f"Invalid JSON body: {error}")

    # ---------------------------------------------------------------------------------------------- routing
    def _route(self):
        parts = [part for part in self.raw_path.split("/") if part != ""]
        method = self.command
        hub = self.hub
        if parts[:1] == ["api"]:
            rest = parts[1:]
            if rest == ["whoami-v2"] and method == "GET":
                return self._whoami()
            if rest == ["repos", "create"] and method == "POST":
                return self._create_repo()
            if rest == ["validate-yaml"] and method == "POST":
                return self._json(200, {"errors": [], "warnings": []})
            if len(rest) >= 3 and rest[0] in REPO_TYPES:
                repo_type = REPO_TYPES[rest[0]]
                repo_id = "/".join(unquote(p) for p in rest[1:3])
                action, args = (rest[3], rest[4:]) if len(rest) > 3 else (None, [])
                with hub.lock:
                    repo = hub._repo(repo_type, repo_id)
                    if action not in ("preupload", "commit", "branch", "tag") or method == "GET":
                        self._check_read(repo)
                return self._repo_api(repo, action, args)
            raise HubError(404, f"Not found: {method} {self.raw_path}")
        if "resolve" in parts and method in ("GET", "HEAD"):
            return self._resolve_file(parts)
        if len(parts) >= 5 and parts[-4:] == ["info", "lfs", "objects", "batch"] and method == "POST":
            return self._lfs_batch(parts[:-4])
        if parts[:1] == ["lfs-upload"] and method == "PUT" and len(parts) == 2:
            return self._lfs_put(parts[1])
        if parts[:1] == ["lfs-verify"] and method == "POST" and len(parts) == 2:
            return self._lfs_verify(parts[1])
        raise HubError(404, f"Not found: {method} {self.raw_path}")

    def _split_repo_path(self, parts: list[str], marker: str) -> tuple[_Repo, list[str]]:
        """`[datasets/]ns/name/<marker>/rest...` -> (repo, rest)."""
        index = parts.index(marker)
        head, rest = parts[:index], parts[index + 1:]
        repo_type = "model"
        if head and head[0] == "datasets" and len(head) >= 2:
            repo_type = REPO_TYPES[head[0]]
            head = head[1:]
        repo_id = "/".join(unquote(part) for part in head)
        with self.hub.lock:
            repo = self.hub._repo(repo_type, repo_id)
        self._check_read(repo)
        return repo, rest

    # ------------------------------------------------------------------------------------------- account
    def _whoami(self):
        self._require_token()
        self._json(200, {
            "type": "user", "id": "0" * 24, "name": self.hub.user, "fullname": "Local Test User",
            "email": f"{self.hub.user}@example.invalid", "emailVerified": True, "canPay": False, "isPro": False,
            "periodEnd": None, "avatarUrl": "", "orgs": [],
            "auth": {"type": "access_token",
                     "accessToken": {"displayName": "local-test", "role": "write", "createdAt": _now()}},
        })

    def _create_repo(self):
        self._require_token()
        payload = self._json_body()
        name, organization = payload.get("name"), payload.get("organization")
        if not name:
            raise HubError(400, "Missing repo name")
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIXES:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        repo_id = f"{organization or self.hub.user}/{name}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        hub = self.hub
        with hub.lock:
            existing = hub.repos.get((repo_type, repo_id))
            if existing is not None:
                url = hub._repo_url(existing)
                raise HubError(409, f"You already created this {repo_type} repo", headers={},
                               body={"error": f"You already created this {repo_type} repo", "url": url})
            repo = _Repo(repo_type, repo_id, private)
            attributes = DEFAULT_GITATTRIBUTES + (DATASET_GITATTRIBUTES_EXTRA if repo_type == "dataset" else "")
            tree = {".gitattributes": hub._entry(attributes.encode(), lfs=False)}
            repo.branches["main"] = hub._new_commit(repo, None, tree, "initial commit", "")
            hub.repos[(repo_type, repo_id)] = repo
            url = hub._repo_url(repo)
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    # --------------------------------------------------------------------------------------------- repo API
    def _repo_api(self, repo: _Repo, action: str | None, args: list[str]):
        method = self.command
        hub = self.hub
        if action is None and method == "GET":
            with hub.lock:
                sha = hub._resolve(repo, "main")
                return self._json(200, hub._info_json(repo, sha, _is_true(self._param("blobs"))))
        if action == "revision" and method == "GET" and args:
            revision = unquote("/".join(args))
            with hub.lock:
                sha = hub._resolve(repo, revision)
                return self._json(200, hub._info_json(repo, sha, _is_true(self._param("blobs"))))
        if action == "tree" and method == "GET" and args:
            return self._tree(repo, unquote(args[0]), unquote("/".join(args[1:])))
        if action == "paths-info" and method == "POST" and args:
            return self._paths_info(repo, unquote("/".join(args)))
        if action == "preupload" and method == "POST" and args:
            return self._preupload(repo, unquote("/".join(args)))
        if action == "commit" and method == "POST" and args:
            return self._commit(repo, unquote("/".join(args)))
        if action == "commits" and method == "GET" and args:
            return self._list_commits(repo, unquote("/".join(args)))
        if action == "refs" and method == "GET":
            return self._refs(repo)
        if action == "branch" and args and method == "POST":
            return self._branch(repo, unquote("/".join(args)))
        if action == "tag" and args and method == "POST":
            return self._tag(repo, unquote("/".join(args)))
        raise HubError(404, f"Not found: {method} {self.raw_path}")

    def _tree(self, repo: _Repo, revision: str, path: str):
        hub = self.hub
        recursive = _is_true(self._param("recursive"))
        cursor = int(self._param("cursor", "0") or 0)
        path = path.strip("/")
        with hub.lock:
            sha = hub._resolve(repo, revision)
            tree = repo.commits[sha]["tree"]
            folders = hub._folders(tree)
            if path and path not in folders:
                headers = {"X-Repo-Commit": sha}
                if path in tree:  # the Hub answers a file's own tree listing with an error too
                    raise HubError(404, f"{path} is a file, not a folder", "EntryNotFound", headers)
                raise HubError(404, f"Entry not found: {path}", "EntryNotFound", headers)
            prefix = f"{path}/" if path else ""
            items = []
            for folder in sorted(folders):
                if folder.startswith(prefix) and (recursive or "/" not in folder[len(prefix):]):
                    items.append(("d", folder))
            for file_path in sorted(tree):
                if file_path.startswith(prefix) and (recursive or "/" not in file_path[len(prefix):]):
                    items.append(("f", file_path))
            items.sort(key=lambda item: item[1])
            page = items[cursor:cursor + hub.page_size]
            out = [hub._folder_json(tree, item_path) if kind == "d" else hub._file_json(item_path, tree[item_path])
                   for kind, item_path in page]
        headers = {}
        if cursor + hub.page_size < len(items):
            query = f"recursive={str(recursive).lower()}&cursor={cursor + hub.page_size}"
            headers["Link"] = f'<{hub.url}{self.raw_path}?{query}>; rel="next"'
        self._json(200, out, headers)

    def _paths_info(self, repo: _Repo, revision: str):
        form = parse_qs(self.body.decode(), keep_blank_values=True)
        paths, expand = form.get("paths", []), _is_true((form.get("expand") or ["false"])[-1])
        hub = self.hub
        out = []
        with hub.lock:
            sha = hub._resolve(repo, revision)
            tree = repo.commits[sha]["tree"]
            folders = hub._folders(tree)
            for path in paths:
                path = path.strip("/")
                last = hub._last_commit(repo, sha, path) if expand else None
                if path in tree:
                    out.append(hub._file_json(path, tree[path], last))
                elif path in folders:
                    out.append(hub._folder_json(tree, path, last))
        self._json(200, out)

    def _writable_branch(self, repo: _Repo, revision: str) -> str:
        if revision in repo.branches:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _preupload(self, repo: _Repo, revision: str):
        self._require_token()
        payload = self._json_body()
        hub = self.hub
        out = []
        with hub.lock:
            tree = repo.commits[repo.branches[self._writable_branch(repo, revision)]]["tree"]
            for item in payload.get("files", []):
                path = item["path"]
                sample = base64.b64decode(item.get("sample") or "")
                mode = hub._upload_mode(repo, tree, path, int(item.get("size") or 0), sample)
                existing = tree.get(path)
                oid = None
                if existing is not None:
                    oid = existing["sha256"] if existing["lfs"] else existing["oid"]
                out.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._json(200, {"files": out, "commitOid": hub.head(repo.repo_id, repo.repo_type)})

    def _commit(self, repo: _Repo, revision: str):
        self._require_token()
        hub = self.hub
        try:
            lines = [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]
        except ValueError as error:
            raise HubError(400, f"Invalid commit payload: {error}")
        header = next((line["value"] for line in lines if line.get("key") == "header"), None)
        if header is None:
            raise HubError(400, "The commit payload has no header line")
        with hub.lock:
            branch = self._writable_branch(repo, revision)
            base_sha = repo.branches[branch]
            parent_commit = header.get("parentCommit")
            if parent_commit and parent_commit != base_sha:
                raise HubError(412, f"A commit has happened since. Please refresh and try again. "
                                    f"(expected parent {parent_commit}, head is {base_sha})")
            tree = dict(repo.commits[base_sha]["tree"])
            for line in lines:
                key, value = line.get("key"), line.get("value") or {}
                if key == "header":
                    continue
                path = (value.get("path") or "").strip("/")
                if key == "file":
                    data = base64.b64decode(value.get("content") or "")
                    if b"\0" in data[:512] or len(data) >= hub.lfs_threshold:
                        raise HubError(400, f"{path}: binary or large files must be uploaded through LFS")
                    tree[path] = hub._entry(data, lfs=False)
                elif key == "lfsFile":
                    oid = value.get("oid") or ""
                    blob = hub._blob_path(oid)
                    if not re.fullmatch(r"[0-9a-f]{64}", oid) or not blob.is_file():
                        raise HubError(422, f"Your push was rejected because an LFS pointer pointed to a file that "
                                            f"does not exist: {path} ({oid})")
                    size = blob.stat().st_size
                    if value.get("size") is not None and int(value["size"]) != size:
                        raise HubError(422, f"{path}: LFS object size mismatch")
                    tree[path] = {"size": size, "sha256": oid, "lfs": True,
                                  "oid": git_blob_oid(lfs_pointer(oid, size))}
                elif key == "deletedFile":
                    if path not in tree:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del tree[path]
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            sha = hub._new_commit(repo, base_sha, tree, header.get("summary") or "", header.get("description") or "")
            repo.branches[branch] = sha
            url = hub._repo_url(repo)
        self._json(200, {"success": True, "commitOid": sha, "commitUrl": f"{url}/commit/{sha}", "hookOutput": ""})

    def _list_commits(self, repo: _Repo, revision: str):
        hub = self.hub
        with hub.lock:
            history = hub._history(repo, hub._resolve(repo, revision))
            out = [{"id": c["id"], "title": c["title"], "message": c["message"], "date": c["date"],
                    "authors": [{"user": c["author"], "avatar": ""}]} for c in history]
        self._json(200, out)

    def _refs(self, repo: _Repo):
        def ref(kind, name, sha):
            return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha}

        with self.hub.lock:
            data = {
                "branches": [ref("heads", name, sha) for name, sha in sorted(repo.branches.items())],
                "tags": [ref("tags", name, sha) for name, sha in sorted(repo.tags.items())],
                "converts": [],
            }
        self._json(200, data)

    def _branch(self, repo: _Repo, branch: str):
        self._require_token()
        hub = self.hub
        with hub.lock:
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            start = self._json_body().get("startingPoint") or "main"
            repo.branches[branch] = hub._resolve(repo, start)
        self._json(200, {})

    def _tag(self, repo: _Repo, revision: str):
        self._require_token()
        hub = self.hub
        with hub.lock:
            tag = self._json_body().get("tag")
            if not tag:
                raise HubError(400, "Missing tag name")
            if tag in repo.tags:
                raise HubError(409, f"Tag already exists: {tag}")
            repo.tags[tag] = hub._resolve(repo, revision)
        self._json(200, {})

    # ------------------------------------------------------------------------------------------------ LFS
    def _lfs_batch(self, head: list[str]):
        self._require_token()
        repo_type = "model"
        if head and head[0] == "datasets" and len(head) >= 3:
            repo_type, head = REPO_TYPES[head[0]], head[1:]
        repo_id = "/".join(unquote(part) for part in head)
        if not repo_id.endswith(".git"):
            raise HubError(404, f"Not found: {self.raw_path}")
        repo_id = repo_id[:-4]
        hub = self.hub
        with hub.lock:
            hub._repo(repo_type, repo_id)
        payload = self._json_body()
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the upload operation is supported")
        objects = []
        for item in payload.get("objects", []):
            oid, size = item.get("oid"), item.get("size")
            if not isinstance(oid, str) or not re.fullmatch(r"[0-9a-f]{64}", oid) or not isinstance(size, int):
                objects.append({"oid": str(oid), "size": int(size or 0),
                                "error": {"code": 422, "message": "Invalid oid or size"}})
                continue
            entry = {"oid": oid, "size": size, "authenticated": True}
            blob = hub._blob_path(oid)
            if not (blob.is_file() and blob.stat().st_size == size):
                entry["actions"] = {
                    "upload": {"href": f"{hub.url}/lfs-upload/{oid}?size={size}", "expires_in": 3600},
                    "verify": {"href": f"{hub.url}/lfs-verify/{oid}", "expires_in": 3600},
                }
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
                   {"Content-Type": LFS_CONTENT_TYPE})

    def _lfs_put(self, oid: str):
        data = self.body
        actual = hashlib.sha256(data).hexdigest()
        if actual != oid:
            raise HubError(400, f"Uploaded content has sha256 {actual}, expected {oid}")
        expected_size = self._param("size")
        if expected_size is not None and int(expected_size) != len(data):
            raise HubError(400, f"Uploaded {len(data)} bytes, expected {expected_size}")
        self.hub._store_blob(data)
        self._send(200, b"", {"ETag": f'"{hashlib.md5(data).hexdigest()}"', "Content-Type": "text/plain"})

    def _lfs_verify(self, oid: str):
        payload = self._json_body()
        blob = self.hub._blob_path(oid)
        if not blob.is_file() or (payload.get("size") is not None and blob.stat().st_size != int(payload["size"])):
            raise HubError(404, f"LFS object {oid} not found")
        self._send(200, b"{}", {"Content-Type": LFS_CONTENT_TYPE})

    # ---------------------------------------------------------------------------------------------- files
    def _resolve_file(self, parts: list[str]):
        repo, rest = self._split_repo_path(parts, "resolve")
        if len(rest) < 2:
            raise HubError(404, f"Not found: {self.raw_path}")
        revision, path = unquote(rest[0]), unquote("/".join(rest[1:]))
        hub = self.hub
        with hub.lock:
            sha = hub._resolve(repo, revision)
            entry = repo.commits[sha]["tree"].get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        size = entry["size"]
        headers = {
            "X-Repo-Commit": sha,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}",
            "Cache-Control": "no-cache",
        }
        if entry["lfs"]:
            headers["ETag"] = f'"{entry["sha256"]}"'
            headers["X-Linked-Etag"] = f'"{entry["sha256"]}"'
            headers["X-Linked-Size"] = str(size)
        else:
            headers["ETag"] = f'"{entry["oid"]}"'
        blob = hub._blob_path(entry["sha256"])
        range_header = self.headers.get("Range")
        start, end, status = 0, size - 1, 200
        if range_header:
            match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", range_header)
            if not match or (match.group(1) == "" and match.group(2) == ""):
                raise HubError(416, f"Invalid range {range_header!r}", headers={"Content-Range": f"bytes */{size}"})
            first, last = match.groups()
            if first == "":  # the last N bytes
                start, end = max(size - int(last), 0), size - 1
            else:
                start = int(first)
                end = min(int(last), size - 1) if last else size - 1
            if start >= size or start > end:
                raise HubError(416, f"Range {range_header!r} not satisfiable for {size} bytes",
                               headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = end - start + 1 if size else 0
        if self.command == "HEAD":
            return self._send(status, b"", headers, content_length=length)
        with open(blob, "rb") as handle:
            handle.seek(start)
            data = handle.read(length)
        self._send(status, data, headers)
