"""A real HTTP server on loopback that speaks the part of the Hugging Face Hub API ``huggingface_hub`` uses to push
and pull a model repo, for the push tests (``HF_ENDPOINT=server.url``, ``HF_HUB_DISABLE_XET=1``).

Endpoints (what huggingface_hub 1.x/2.x calls; read from its source, not guessed):

* ``POST /api/repos/create``                                   create_repo (initial commit with .gitattributes)
* ``GET  /api/models/{repo}[/revision/{rev}]``                 repo_info / model_info
* ``POST /api/models/{repo}/branch/{branch}``                  create_branch
* ``POST /api/models/{repo}/preupload/{rev}``                  upload modes (regular / lfs) + remote oids
* ``POST /{repo}.git/info/lfs/objects/batch``                  LFS batch API, basic transfer (upload + verify)
* ``PUT  /lfs/upload/{oid}``, ``POST /lfs/verify/{oid}``        the upload / verify hrefs the batch hands out
* ``POST /api/models/{repo}/commit/{rev}[?create_pr=1]``        ndjson commit (file / lfsFile / deletedFile)
* ``POST /api/models/{repo}/paths-info/{rev}``, ``GET .../tree/{rev}[/path]``, ``GET .../commits/{rev}``
* ``POST /api/validate-yaml``                                  the README front-matter check create_commit makes
* ``HEAD|GET /{repo}/resolve/{rev}/{path}``                    downloads, with ETag / X-Repo-Commit / Content-Length
                                                               (+ X-Linked-Etag / X-Linked-Size for LFS files), Range
* ``GET  /api/whoami-v2``

Dataset repos (``repo_type="dataset"``) answer the same read routes under ``/api/datasets/{repo}/...`` and
``/datasets/{repo}/resolve/{rev}/{path}``; the test-side API names them ``datasets/OWNER/NAME`` (``dataset_id``).

Downloads (``hf_hub_download`` / ``snapshot_download``, 2.x): ``GET /api/models/{repo}/revision/{rev}`` for the commit,
``GET .../tree/{commit}?recursive=true`` for the file list and sizes, then ``HEAD`` + ``GET`` (ranged when resuming)
on ``/{repo}/resolve/{commit}/{path}``; revisions are branches, full or short commit ids (``refs/pr/N`` too).

Writes need ``Authorization: Bearer <token>`` (401 otherwise) in a namespace the token's user owns (403
otherwise); a token that is sent must be valid, reads included (401 "Invalid credentials", as the Hub). Private repos
read as 404 without a token; gated repos (``create(..., gated="auto"|"manual")``) answer 401 ``GatedRepo`` without one
and, when "manual", 403 ``GatedRepo`` with one (access not granted). ``inject()`` makes the next matching requests
fail with a status (401/403/404/409/503...) or drop the connection; ``requests`` records what was asked.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".npz", ".gz", ".tar", ".zip")
GITATTRIBUTES = b"".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n".encode() for s in LFS_SUFFIXES)
REGULAR_MAX = 10 * 1024 * 1024  # larger files must go through LFS, as on the Hub


def dataset_id(repo_id: str) -> str:
    """The server's key of a dataset repo (``create(dataset_id("o/n"), ...)``, ``downloads(dataset_id("o/n"))``)."""
    return f"datasets/{repo_id}"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class Entry:
    sha256: str
    size: int
    lfs: bool
    sha1: str  # git oid of the blob (of the pointer file for LFS entries)


@dataclass
class Commit:
    oid: str
    parent: Optional[str]
    title: str
    description: str
    files: dict
    date: str


@dataclass
class Repo:
    id: str
    private: bool
    branches: dict = field(default_factory=dict)  # name -> commit oid
    commits: dict = field(default_factory=dict)  # oid -> Commit
    prs: int = 0
    gated: Optional[str] = None  # None | "auto" (any valid token reads) | "manual" (access never granted: 403)


@dataclass
class Rule:
    status: int
    path: str  # regex searched in "METHOD /path?query"
    times: int
    message: str
    drop: bool = False
    code: Optional[str] = None
    hits: int = 0


class HubState:
    def __init__(self, user: str, token: str, orgs=()):
        self.user, self.token, self.namespaces = user, token, {user, *orgs}
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 -> content (regular and LFS files)
        self.lfs_uploaded: set[str] = set()
        self.requests: list[dict] = []
        self.rules: list[Rule] = []
        self.lock = threading.RLock()
        self._n = 0

    # -------------------------------------------------------------------------------------------- helpers
    def new_oid(self, *parts) -> str:
        self._n += 1
        return hashlib.sha1(repr((self._n, time.time_ns(), parts)).encode()).hexdigest()

    def put_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.blobs[sha] = data
        return sha

    def make_commit(self, repo: Repo, branch: str, title: str, description: str, files: dict) -> Commit:
        parent = repo.branches.get(branch)
        oid = self.new_oid(repo.id, branch, title, sorted(files))
        c = Commit(oid, parent, title, description, files, time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()))
        repo.commits[oid] = c
        repo.branches[branch] = oid
        return c

    def resolve(self, repo: Repo, rev: str) -> Optional[Commit]:
        if rev in repo.branches:
            return repo.commits[repo.branches[rev]]
        if rev in repo.commits:
            return repo.commits[rev]
        matches = [c for oid, c in repo.commits.items() if len(rev) >= 7 and oid.startswith(rev)]
        return matches[0] if len(matches) == 1 else None

    # ------------------------------------------------------------------------------------ test-side API
    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        """path -> content of the repo at ``rev`` (LFS files resolved to their content)."""
        with self.lock:
            c = self.resolve(self.repos[repo_id], rev)
            return {p: self.blobs[e.sha256] for p, e in c.files.items()}

    def history(self, repo_id: str, rev: str = "main") -> list[Commit]:
        """Commits reachable from ``rev``, newest first."""
        with self.lock:
            repo = self.repos[repo_id]
            out, c = [], self.resolve(repo, rev)
            while c is not None:
                out.append(c)
                c = repo.commits.get(c.parent) if c.parent else None
            return out

    def inject(self, status: int, path: str, times: int = 1, message: str = "injected error",
               drop: bool = False, code: Optional[str] = None) -> Rule:
        """The next ``times`` requests whose "METHOD /path?query" matches the regex ``path`` get ``status`` (with
        ``X-Error-Code: code`` when given) or, with ``drop=True``, a connection closed without an answer."""
        rule = Rule(status, path, times, message, drop, code)
        with self.lock:
            self.rules.append(rule)
        return rule

    def create(self, repo_id: str, private: bool = False, files: Optional[dict] = None, lfs: bool = False,
               gated: Optional[str] = None) -> Repo:
        """Make a repo server-side (as if pushed by someone else), optionally with files in a second commit;
        ``lfs=True`` stores the files .gitattributes names (weights) as LFS objects, as the Hub does."""
        with self.lock:
            repo = self.repos[repo_id] = Repo(repo_id, private, gated=gated)
            ga = self.put_blob(GITATTRIBUTES)
            self.make_commit(repo, "main", "initial commit", "",
                             {".gitattributes": Entry(ga, len(GITATTRIBUTES), False, git_blob_sha1(GITATTRIBUTES))})
            if files:
                self.add_files(repo_id, files, lfs=lfs)
            return repo

    def add_files(self, repo_id: str, files: dict, lfs: bool = False, branch: str = "main",
                  title: str = "add files") -> Commit:
        """A commit on ``branch`` adding (or replacing) ``files`` (path -> bytes), as if pushed by someone else."""
        with self.lock:
            repo = self.repos[repo_id]
            base = repo.commits[repo.branches[branch]] if branch in repo.branches else \
                repo.commits[repo.branches["main"]]
            cur = dict(base.files)
            for p, data in files.items():
                sha = self.put_blob(data)
                if lfs and p.endswith(LFS_SUFFIXES):
                    self.lfs_uploaded.add(sha)
                    cur[p] = Entry(sha, len(data), True, git_blob_sha1(lfs_pointer(sha, len(data))))
                else:
                    cur[p] = Entry(sha, len(data), False, git_blob_sha1(data))
            if branch not in repo.branches:
                repo.branches[branch] = base.oid
            return self.make_commit(repo, branch, title, "", cur)

    def downloads(self, repo_id: str, path: Optional[str] = None) -> list[dict]:
        """The GET requests that fetched file content from ``repo_id`` (of ``path`` when given)."""
        with self.lock:
            return [r for r in self.requests if r["method"] == "GET" and r["path"].startswith(f"/{repo_id}/resolve/")
                    and (path is None or r["path"].endswith("/" + path))]


class HubServer:
    """``with HubServer() as hub: ...`` — a ThreadingHTTPServer on 127.0.0.1 (a free port) in a daemon thread."""

    def __init__(self, user: str = "tester", token: str = "hf_tEsTtOkEn0123456789secret", orgs=("evaclip-org",)):
        self.state = HubState(user, token, orgs)
        state = self.state

        class Handler(_Handler):
            hub = state

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        state.url = self.url
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def __getattr__(self, item):  # files(), history(), inject(), create(), requests, repos, token, ...
        return getattr(self.state, item)


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None, headers: Optional[dict] = None,
                 extra: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubState

    def log_message(self, *args):  # quiet
        pass

    # ------------------------------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body=b"", headers: Optional[dict] = None, head: bool = False):
        headers = dict(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        length = headers.pop("Content-Length", len(body))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _auth_user(self) -> Optional[str]:
        auth = self.headers.get("Authorization", "")
        if not auth:
            return None
        if auth != f"Bearer {self.hub.token}":
            raise HttpError(401, "Invalid credentials in Authorization header",
                            headers={"X-Error-Message": "Invalid credentials in Authorization header"})
        return self.hub.user

    def _need_write(self, namespace: str):
        user = self._auth_user()
        if user is None:
            raise HttpError(401, "You must be authenticated to access this resource",
                            headers={"X-Error-Message": "Invalid credentials in Authorization header"})
        if namespace not in self.hub.namespaces:
            raise HttpError(403, f"You don't have the rights to write to the namespace \"{namespace}\"",
                            headers={"X-Error-Message": f"You don't have the rights to write to {namespace}"})

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        if write:
            self._need_write(repo_id.split("/")[0])
        user = self._auth_user()  # a token that is sent must be valid, reads included
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and user is None):
            raise HttpError(404, "Repository not found", "RepoNotFound")
        if repo.gated and not write:
            if user is None:
                raise HttpError(401, f"Access to model {repo_id} is restricted. You must have access to it and be "
                                "authenticated to access it. Please log in.", "GatedRepo")
            if repo.gated == "manual":
                raise HttpError(403, f"Access to model {repo_id} is restricted and you are not in the authorized "
                                "list. Visit the repo page to ask for access.", "GatedRepo")
        return repo

    def _commit(self, repo: Repo, rev: str) -> Commit:
        c = self.hub.resolve(repo, rev)
        if c is None:
            raise HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return c

    def _dispatch(self, method: str):
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        segs = [unquote(s) for s in parts.path.split("/")[1:]]
        body = self._body() if method in ("POST", "PUT") else b""
        hub = self.hub
        with hub.lock:
            hub.requests.append({"method": method, "path": parts.path, "query": parts.query,
                                 "authorization": self.headers.get("Authorization"), "size": len(body)})
            for rule in hub.rules:
                if rule.hits < rule.times and re.search(rule.path, f"{method} {parts.path}?{parts.query}"):
                    rule.hits += 1
                    if rule.drop:
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    raise HttpError(rule.status, rule.message, rule.code,
                                    headers={"X-Error-Message": rule.message} if rule.status in (401, 403) else None)
        if segs[:1] == ["api"]:
            return self._api(method, segs[1:], query, body)
        if segs[:1] == ["lfs"]:
            return self._lfs_object(method, segs[1:], body)
        if len(segs) >= 3 and segs[1].endswith(".git") and segs[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{segs[0]}/{segs[1][:-4]}", body)
        if segs[:1] == ["datasets"] and len(segs) >= 6 and segs[3] == "resolve":
            return self._resolve(method, dataset_id(f"{segs[1]}/{segs[2]}"), segs[4], "/".join(segs[5:]))
        if len(segs) >= 5 and segs[2] == "resolve":
            return self._resolve(method, f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]))
        raise HttpError(404, f"no route for {method} {parts.path}")

    def _handle(self, method: str):
        try:
            self._dispatch(method)
        except HttpError as e:
            headers = dict(e.headers)
            if e.code:
                headers["X-Error-Code"] = e.code
            self._send(e.status, {"error": e.message, **e.extra}, headers, head=method == "HEAD")
        except OSError:  # the client went away (or a dropped connection was injected)
            self.close_connection = True

    def do_GET(self):
        self._handle("GET")

    def do_HEAD(self):
        self._handle("HEAD")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    # ---------------------------------------------------------------------------------------------- API
    def _api(self, method: str, segs: list[str], query: dict, body: bytes):
        hub = self.hub
        if method == "POST" and segs == ["repos", "create"]:
            return self._create_repo(json.loads(body or b"{}"))
        if method == "POST" and segs == ["validate-yaml"]:
            return self._validate_yaml(json.loads(body or b"{}"))
        if method == "GET" and segs == ["whoami-v2"]:
            if self._auth_user() is None:
                raise HttpError(401, "Invalid credentials in Authorization header")
            return self._send(200, {"type": "user", "name": hub.user, "orgs": [{"name": o} for o in hub.namespaces
                                                                                 if o != hub.user]})
        if len(segs) < 3 or segs[0] not in ("models", "datasets"):
            raise HttpError(404, f"no API route {'/'.join(segs)}")
        bare, rest = f"{segs[1]}/{segs[2]}", segs[3:]
        repo_id = bare if segs[0] == "models" else dataset_id(bare)
        with hub.lock:
            if method == "GET" and (not rest or rest[0] == "revision"):
                repo = self._repo(repo_id)
                c = self._commit(repo, rest[1] if rest else "main")
                return self._send(200, {"id": bare, "modelId": bare, "author": segs[1], "sha": c.oid,
                                        "private": repo.private, "lastModified": c.date, "tags": [],
                                        "siblings": [{"rfilename": p} for p in sorted(c.files)]})
            if method == "POST" and rest[:1] == ["branch"]:
                repo = self._repo(repo_id, write=True)
                branch = rest[1]
                if branch in repo.branches:
                    raise HttpError(409, f"Branch {branch} already exists")
                start = json.loads(body or b"{}").get("startingPoint") or "main"
                repo.branches[branch] = self._commit(repo, start).oid
                return self._send(200, {})
            if method == "POST" and rest[:1] == ["preupload"]:
                return self._preupload(self._repo(repo_id, write=True), rest[1], json.loads(body))
            if method == "POST" and rest[:1] == ["commit"]:
                return self._commit_ndjson(self._repo(repo_id, write=True), rest[1], body,
                                           create_pr=query.get("create_pr") == ["1"])
            if method == "POST" and rest[:1] == ["paths-info"]:
                c = self._commit(self._repo(repo_id), rest[1])
                form = parse_qs(body.decode())
                return self._send(200, [self._file_info(p, c.files[p]) for p in form.get("paths", [])
                                        if p in c.files])
            if method == "GET" and rest[:1] == ["tree"]:
                c = self._commit(self._repo(repo_id), rest[1])
                return self._send(200, self._tree(c, "/".join(rest[2:]), query.get("recursive") == ["True"]
                                                  or query.get("recursive") == ["true"]))
            if method == "GET" and rest[:1] == ["commits"]:
                repo = self._repo(repo_id)
                self._commit(repo, rest[1])
                return self._send(200, [{"id": c.oid, "title": c.title, "message": c.description, "date": c.date,
                                         "authors": [{"user": hub.user}]} for c in hub.history(repo_id, rest[1])])
        raise HttpError(404, f"no API route {method} {'/'.join(segs)}")

    def _create_repo(self, payload: dict):
        name, org = payload.get("name"), payload.get("organization")
        if payload.get("type", "model") not in (None, "model"):
            raise HttpError(400, "only model repos here")
        namespace = org or self._auth_user() or ""
        self._need_write(namespace)
        if not name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", name):
            raise HttpError(400, f"Invalid repo name: {name!r}")
        repo_id = f"{namespace}/{name}"
        with self.hub.lock:
            if repo_id in self.hub.repos:
                raise HttpError(409, "You already created this model repo",
                                extra={"url": f"{self.hub.url}/{repo_id}"})
            self.hub.create(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        return self._send(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _validate_yaml(self, payload: dict):
        import yaml

        content = payload.get("content", "")
        m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, flags=re.S)
        if m:
            try:
                meta = yaml.safe_load(m.group(1))
            except yaml.YAMLError as e:
                return self._send(400, {"errors": [{"message": f"Invalid YAML in README.md: {e}"}]})
            if meta is not None and not isinstance(meta, dict):
                return self._send(400, {"errors": [{"message": "README.md metadata must be a mapping"}]})
        return self._send(200, {"errors": [], "warnings": []})

    @staticmethod
    def _is_lfs(path: str, size: int, sample: bytes) -> bool:
        return path.endswith(LFS_SUFFIXES) or size > REGULAR_MAX or b"\0" in sample

    def _preupload(self, repo: Repo, rev: str, payload: dict):
        c = self._commit(repo, rev)
        out = []
        for f in payload.get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = self._is_lfs(f["path"], int(f["size"]), sample)
            cur = c.files.get(f["path"])
            oid = None if cur is None else (cur.sha256 if cur.lfs else cur.sha1)
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": oid})
        return self._send(200, {"files": out, "commitOid": c.oid})

    def _lfs_batch(self, repo_id: str, body: bytes):
        with self.hub.lock:
            self._repo(repo_id, write=True)
        req = json.loads(body)
        if req.get("operation") != "upload" or "basic" not in req.get("transfers", ["basic"]):
            raise HttpError(400, "only basic uploads here")
        objects = []
        for o in req.get("objects", []):
            oid, size = o["oid"], int(o["size"])
            item = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.hub.lfs_uploaded:
                item["actions"] = {"upload": {"href": f"{self.hub.url}/lfs/upload/{oid}?size={size}"},
                                   "verify": {"href": f"{self.hub.url}/lfs/verify/{oid}"}}
            objects.append(item)
        return self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                          {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_object(self, method: str, segs: list[str], body: bytes):
        hub = self.hub
        if method == "PUT" and segs[:1] == ["upload"]:
            oid = segs[1]
            if hashlib.sha256(body).hexdigest() != oid:
                raise HttpError(400, f"uploaded content does not hash to {oid}")
            with hub.lock:
                hub.blobs[oid] = body
                hub.lfs_uploaded.add(oid)
            return self._send(200, b"")
        if method == "POST" and segs[:1] == ["verify"]:
            oid = segs[1]
            if json.loads(body or b"{}").get("oid", oid) != oid:
                raise HttpError(400, "verify: oid mismatch")
            if oid not in hub.lfs_uploaded:
                raise HttpError(404, f"object {oid} not uploaded")
            return self._send(200, {})
        raise HttpError(404, "no such LFS route")

    def _commit_ndjson(self, repo: Repo, rev: str, body: bytes, create_pr: bool):
        hub = self.hub
        lines = [json.loads(ln) for ln in body.decode().splitlines() if ln.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HttpError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        base = self._commit(repo, rev)
        if header.get("parentCommit") and not base.oid.startswith(header["parentCommit"]):
            raise HttpError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(base.files)
        for item in lines[1:]:
            key, v = item.get("key"), item.get("value", {})
            if key == "file":
                data = base64.b64decode(v["content"]) if v.get("encoding") == "base64" else v["content"].encode()
                if self._is_lfs(v["path"], len(data), data[:512]) and v["path"].endswith(LFS_SUFFIXES):
                    raise HttpError(400, f"{v['path']} must be uploaded with LFS (see .gitattributes)")
                files[v["path"]] = Entry(hub.put_blob(data), len(data), False, git_blob_sha1(data))
            elif key == "lfsFile":
                oid = v["oid"]
                if oid not in hub.lfs_uploaded:
                    raise HttpError(422, f"LFS file {v['path']} ({oid}) was not uploaded")
                size = len(hub.blobs[oid])
                if "size" in v and int(v["size"]) != size:
                    raise HttpError(422, f"LFS file {v['path']}: size {v['size']} != uploaded {size}")
                files[v["path"]] = Entry(oid, size, True, git_blob_sha1(lfs_pointer(oid, size)))
            elif key == "deletedFile":
                if v["path"] not in files:
                    raise HttpError(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[v["path"]]
            elif key == "deletedFolder":
                files = {p: e for p, e in files.items() if not p.startswith(v["path"].rstrip("/") + "/")}
            else:
                raise HttpError(400, f"unknown commit operation {key!r}")
        branch = rev if rev in repo.branches else None
        pr_url = None
        if create_pr:
            repo.prs += 1
            branch = f"refs/pr/{repo.prs}"
            repo.branches[branch] = base.oid
            pr_url = f"{hub.url}/{repo.id}/discussions/{repo.prs}"
        elif branch is None:
            raise HttpError(400, f"cannot commit to {rev}: not a branch")
        c = hub.make_commit(repo, branch, header.get("summary", ""), header.get("description", ""), files)
        return self._send(200, {"success": True, "commitOid": c.oid, "commitUrl": f"{hub.url}/{repo.id}/commit/{c.oid}",
                                "pullRequestUrl": pr_url, "hookOutput": ""})

    def _file_info(self, path: str, e: Entry) -> dict:
        info = {"type": "file", "path": path, "size": e.size, "oid": e.sha1}
        if e.lfs:
            info["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": len(lfs_pointer(e.sha256, e.size))}
        return info

    def _tree(self, c: Commit, prefix: str, recursive: bool) -> list:
        prefix = prefix.strip("/")
        base = prefix + "/" if prefix else ""
        out, folders = [], set()
        for path in sorted(c.files):
            if not path.startswith(base):
                continue
            rel = path[len(base):]
            if "/" in rel:
                for i in range(len(rel.split("/")) - 1 if recursive else 1):
                    folders.add(base + "/".join(rel.split("/")[: i + 1]))
                if not recursive:
                    continue
            out.append(self._file_info(path, c.files[path]))
        out += [{"type": "directory", "path": f, "oid": git_blob_sha1(f.encode())} for f in sorted(folders)]
        return out

    def _resolve(self, method: str, repo_id: str, rev: str, path: str):
        if method not in ("GET", "HEAD"):
            raise HttpError(405, "method not allowed")
        with self.hub.lock:
            repo = self._repo(repo_id)
            c = self._commit(repo, rev)
            e = c.files.get(path)
            if e is None:
                raise HttpError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": c.oid})
            data = self.hub.blobs[e.sha256]
        headers = {"X-Repo-Commit": c.oid, "ETag": f'"{e.sha256 if e.lfs else e.sha1}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if e.lfs:  # what the Hub adds for LFS files (huggingface_hub prefers them to ETag / Content-Length)
            headers.update({"X-Linked-Etag": f'"{e.sha256}"', "X-Linked-Size": str(e.size)})
        rng = self.headers.get("Range")
        status = 200
        if rng and method == "GET":
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if m:
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else len(data) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                data, status = data[start:end + 1], 206
        if method == "HEAD":
            headers["Content-Length"] = len(data)
            return self._send(status, b"", headers, head=True)
        return self._send(status, data, headers)


def point_hub_at(server: "HubServer", tmp_path, monkeypatch):
    """huggingface_hub in this process pointed at ``server``, with an empty cache and no stored login of its own
    (under ``tmp_path``); returns the cache folder."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    return cache
