"""The local Hub server (`tests/hub_server.py`) driven by the real `huggingface_hub` client, each scenario in a fresh
interpreter whose `HF_ENDPOINT` points at the server. Raw HTTP checks (ranges, headers) use the standard library."""

import hashlib
import json
import textwrap
import urllib.error
import urllib.request

import pytest
from hub_server import HubServer, git_blob_oid, last_json_line, run_python

LFS_SIZED = 10 * 1024 * 1024 + 123  # over the Hub's 10 MB limit for regular (non-LFS) files


@pytest.fixture(scope="module")
def hub():
    with HubServer() as server:
        yield server


@pytest.fixture()
def env(hub, tmp_path):
    return hub.client_env(tmp_path / "hf_home")


def client(code: str, env: dict, *args: str, cwd=None):
    return last_json_line(run_python(textwrap.dedent(code), env, *map(str, args), cwd=cwd, timeout=120))


def http(method: str, url: str, headers: dict | None = None, data: bytes | None = None):
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_whoami_create_and_exists(hub, env):
    result = client("""
        import json
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError
        api = HfApi()
        out = {"whoami": api.whoami()["name"]}
        url = api.create_repo("user/created")
        out["url"], out["repo_id"], out["type"] = str(url), url.repo_id, url.repo_type
        out["again"] = str(api.create_repo("user/created", exist_ok=True))
        try:
            api.create_repo("user/created")
        except HfHubHTTPError as error:
            out["conflict"] = error.response.status_code
        dataset_url = api.create_repo("user/created-data", repo_type="dataset", private=True)
        out["dataset_url"], out["dataset_type"] = str(dataset_url), dataset_url.repo_type
        out["exists"] = [api.repo_exists("user/created"), api.repo_exists("user/created-data", repo_type="dataset"),
                         api.repo_exists("user/missing"), api.repo_exists("user/created", repo_type="dataset")]
        info = api.dataset_info("user/created-data")
        out["dataset_private"], out["dataset_sha"] = info.private, info.sha
        out["files"] = api.list_repo_files("user/created")
        anonymous = HfApi(token=False)
        try:
            anonymous.create_repo("user/anonymous")
        except HfHubHTTPError as error:
            out["anonymous_create"] = error.response.status_code
        out["anonymous_sees_private"] = anonymous.repo_exists("user/created-data", repo_type="dataset")
        print(json.dumps(out))
    """, env)
    assert result["whoami"] == "user"
    assert result["url"] == f"{hub.url}/user/created" == result["again"]
    assert (result["repo_id"], result["type"]) == ("user/created", "model")
    assert result["conflict"] == 409
    assert result["dataset_url"] == f"{hub.url}/datasets/user/created-data" and result["dataset_type"] == "dataset"
    assert result["exists"] == [True, True, False, False]
    assert result["dataset_private"] is True and result["dataset_sha"] == hub.head("user/created-data", "dataset")
    assert result["files"] == [".gitattributes"]  # a new repository starts with the Hub's initial commit
    assert result["anonymous_create"] == 401 and result["anonymous_sees_private"] is False


def test_upload_folder_with_lfs_file_then_download_and_list(hub, env, tmp_path):
    folder = tmp_path / "upload"
    (folder / "nested" / "deeper").mkdir(parents=True)
    (folder / "README.md").write_text("---\nlibrary_name: transformers\ntags:\n- test\n---\n# hello\n")
    (folder / "config.json").write_text(json.dumps({"model_type": "attention_unet", "architectures": ["X"]}))
    (folder / "nested" / "notes.txt").write_text("some notes\n")
    (folder / "nested" / "deeper" / "weights.safetensors").write_bytes(bytes(range(256)) * 40)  # LFS by pattern
    big = (b"0123456789abcdef" * (LFS_SIZED // 16 + 1))[:LFS_SIZED]  # text, LFS only by size
    (folder / "big.txt").write_bytes(big)
    result = client("""
        import json, sys
        from huggingface_hub import (HfApi, HfFileSystem, get_hf_file_metadata, hf_hub_download, hf_hub_url,
                                     snapshot_download)
        from huggingface_hub.errors import EntryNotFoundError
        folder = sys.argv[1]
        api = HfApi()
        api.create_repo("user/uploaded")
        commit = api.upload_folder(repo_id="user/uploaded", folder_path=folder, commit_message="add files")
        out = {"oid": commit.oid, "commit_url": commit.commit_url}
        out["files"] = sorted(api.list_repo_files("user/uploaded"))
        out["top"] = sorted((entry.path, type(entry).__name__) for entry in api.list_repo_tree("user/uploaded"))
        out["nested"] = sorted(entry.path for entry in api.list_repo_tree("user/uploaded", "nested", recursive=True))
        tree = {entry.path: entry for entry in api.list_repo_tree("user/uploaded", recursive=True)}
        out["big_lfs"] = tree["big.txt"].lfs["sha256"] if tree["big.txt"].lfs else None
        out["weights_lfs"] = bool(tree["nested/deeper/weights.safetensors"].lfs)
        out["notes_lfs"] = tree["nested/notes.txt"].lfs is not None
        out["notes_blob"] = tree["nested/notes.txt"].blob_id
        info = api.model_info("user/uploaded", files_metadata=True)
        out["info_sha"], out["card_tags"] = info.sha, info.card_data.tags if info.card_data else None
        out["siblings"] = {s.rfilename: [s.size, s.lfs is not None] for s in info.siblings}
        paths = api.get_paths_info("user/uploaded", ["config.json", "nested", "missing.txt"], expand=True)
        out["paths_info"] = [[p.path, type(p).__name__, p.last_commit.oid if p.last_commit else None] for p in paths]
        big_path = hf_hub_download("user/uploaded", "big.txt")
        out["big_download_ok"] = open(big_path, "rb").read() == open(f"{folder}/big.txt", "rb").read()
        meta = get_hf_file_metadata(hf_hub_url("user/uploaded", "big.txt"))
        out["big_meta"] = [meta.etag, meta.size, meta.commit_hash]
        meta = get_hf_file_metadata(hf_hub_url("user/uploaded", "nested/notes.txt"))
        out["notes_meta"] = [meta.etag, meta.size]
        snapshot = snapshot_download("user/uploaded", allow_patterns=["*.json", "nested/*.txt"], cache_dir=sys.argv[2])
        import pathlib
        out["snapshot"] = sorted(str(p.relative_to(snapshot)) for p in pathlib.Path(snapshot).rglob("*") if p.is_file())
        fs = HfFileSystem()
        with fs.open("user/uploaded/big.txt", "rb", block_size=1 << 16) as handle:
            handle.seek(5_000_003)
            out["fs_slice"] = handle.read(20).decode()
        try:
            hf_hub_download("user/uploaded", "not-there.txt")
        except EntryNotFoundError:
            out["missing"] = "EntryNotFoundError"
        print(json.dumps(out))
    """, env, folder, tmp_path / "snapshot_cache")
    sha = hub.head("user/uploaded")
    assert result["oid"] == sha and result["info_sha"] == sha
    assert result["commit_url"] == f"{hub.url}/user/uploaded/commit/{sha}"
    assert result["files"] == [".gitattributes", "README.md", "big.txt", "config.json",
                               "nested/deeper/weights.safetensors", "nested/notes.txt"]
    assert result["top"] == [[".gitattributes", "RepoFile"], ["README.md", "RepoFile"], ["big.txt", "RepoFile"],
                             ["config.json", "RepoFile"], ["nested", "RepoFolder"]]
    assert result["nested"] == ["nested/deeper", "nested/deeper/weights.safetensors", "nested/notes.txt"]
    big_sha256 = hashlib.sha256(big).hexdigest()
    assert result["big_lfs"] == big_sha256 and result["weights_lfs"] and not result["notes_lfs"]
    assert result["notes_blob"] == git_blob_oid(b"some notes\n")
    assert result["card_tags"] == ["test"]
    assert result["siblings"]["big.txt"] == [LFS_SIZED, True] and result["siblings"]["config.json"][1] is False
    assert result["paths_info"] == [["config.json", "RepoFile", sha], ["nested", "RepoFolder", sha]]
    assert result["big_download_ok"]
    assert result["big_meta"] == [big_sha256, LFS_SIZED, sha]
    assert result["notes_meta"] == [git_blob_oid(b"some notes\n"), 11]
    assert result["snapshot"] == ["config.json", "nested/notes.txt"]
    assert result["fs_slice"] == big[5_000_003:5_000_023].decode()
    assert result["missing"] == "EntryNotFoundError"
    stored = hub.files("user/uploaded")
    assert stored["big.txt"]["lfs"] and stored["big.txt"]["size"] == LFS_SIZED
    assert stored["nested/deeper/weights.safetensors"]["lfs"] and not stored["config.json"]["lfs"]
    # The bytes went through the LFS batch API (basic transfer), not inline in the commit.
    puts = [path for method, path, status in hub.requests if method == "PUT" and status == 200]
    assert any(big_sha256 in path for path in puts)


def test_range_requests_and_download_headers(hub, env, tmp_path):
    (tmp_path / "up").mkdir()
    payload = bytes(range(256)) * 64  # 16 KiB, binary => LFS
    (tmp_path / "up" / "blob.bin").write_bytes(payload)
    (tmp_path / "up" / "small.txt").write_text("0123456789")
    client("""
        import json, sys
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo("user/ranged")
        commit = api.upload_folder(repo_id="user/ranged", folder_path=sys.argv[1], commit_message="x")
        print(json.dumps({"oid": commit.oid}))
    """, env, tmp_path / "up")
    url = f"{hub.url}/user/ranged/resolve/main/blob.bin"
    sha = hub.head("user/ranged")
    status, headers, body = http("HEAD", url)
    assert status == 200 and body == b""
    assert headers["X-Repo-Commit"] == sha and headers["Accept-Ranges"] == "bytes"
    assert headers["X-Linked-Etag"].strip('"') == hashlib.sha256(payload).hexdigest() == headers["ETag"].strip('"')
    assert int(headers["X-Linked-Size"]) == len(payload) == int(headers["Content-Length"])
    status, headers, body = http("GET", url, {"Range": "bytes=100-199"})
    assert status == 206 and body == payload[100:200] and headers["Content-Range"] == f"bytes 100-199/{len(payload)}"
    status, headers, body = http("GET", url, {"Range": "bytes=16000-"})
    assert status == 206 and body == payload[16000:]
    status, headers, body = http("GET", url, {"Range": "bytes=-10"})
    assert status == 206 and body == payload[-10:]
    status, headers, _ = http("GET", url, {"Range": f"bytes={len(payload)}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(payload)}"
    status, headers, body = http("GET", f"{hub.url}/user/ranged/resolve/{sha}/small.txt")
    assert status == 200 and body == b"0123456789" and headers["ETag"].strip('"') == git_blob_oid(b"0123456789")
    assert "X-Linked-Etag" not in headers
    status, headers, _ = http("GET", f"{hub.url}/user/ranged/resolve/main/absent.txt")
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound" and headers["X-Repo-Commit"] == sha
    status, headers, _ = http("GET", f"{hub.url}/user/ranged/resolve/no-such-branch/small.txt")
    assert status == 404 and headers["X-Error-Code"] == "RevisionNotFound"
    status, headers, _ = http("HEAD", f"{hub.url}/user/absent/resolve/main/small.txt")
    assert status == 404 and headers["X-Error-Code"] == "RepoNotFound"


def test_commits_are_revisions(hub, env, tmp_path):
    folder = tmp_path / "rev"
    folder.mkdir()
    (folder / "value.txt").write_text("one")
    result = client("""
        import json, pathlib, sys
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download
        from huggingface_hub.errors import RevisionNotFoundError
        folder = pathlib.Path(sys.argv[1])
        api = HfApi()
        api.create_repo("user/revisions")
        first = api.upload_folder(repo_id="user/revisions", folder_path=folder, commit_message="one").oid
        unchanged = api.upload_folder(repo_id="user/revisions", folder_path=folder, commit_message="noop").oid
        (folder / "value.txt").write_text("two")
        (folder / "added.txt").write_text("new")
        second = api.upload_folder(repo_id="user/revisions", folder_path=folder, commit_message="two").oid
        api.create_branch("user/revisions", branch="stable", revision=first)
        api.create_tag("user/revisions", tag="v1", revision=first)
        read = lambda revision: open(hf_hub_download("user/revisions", "value.txt", revision=revision)).read()
        out = {"first": first, "unchanged": unchanged, "second": second,
               "main": read("main"), "at_first": read(first), "short": read(first[:10]), "branch": read("stable"),
               "tag": read("v1"), "at_second": read(second)}
        listing = lambda folder: sorted(p.name for p in pathlib.Path(folder).iterdir())
        out["old_snapshot"] = listing(snapshot_download("user/revisions", revision=first))
        out["new_snapshot"] = listing(snapshot_download("user/revisions"))
        out["history"] = [c.title for c in api.list_repo_commits("user/revisions")]
        out["stable_history"] = [c.commit_id for c in api.list_repo_commits("user/revisions", revision="stable")]
        refs = api.list_repo_refs("user/revisions")
        out["branches"] = sorted((b.name, b.target_commit) for b in refs.branches)
        out["tags"] = [(t.name, t.target_commit) for t in refs.tags]
        out["info_at_first"] = api.model_info("user/revisions", revision=first).sha
        out["revision_exists"] = [api.revision_exists("user/revisions", name) for name in ("stable", "nope")]
        try:
            api.model_info("user/revisions", revision="nope")
        except RevisionNotFoundError:
            out["missing_revision"] = True
        commit = api.upload_file(path_or_fileobj=b"three", path_in_repo="value.txt", repo_id="user/revisions",
                                 revision="stable", commit_message="on stable")
        out["stable_after"], out["main_after"] = read("stable"), read("main")
        from huggingface_hub import CommitOperationAdd
        try:
            api.create_commit("user/revisions", [CommitOperationAdd("late.txt", b"x")], commit_message="stale",
                              parent_commit=first)
        except Exception as error:
            out["stale_parent"] = error.response.status_code
        api.delete_file("added.txt", repo_id="user/revisions", commit_message="remove")
        out["after_delete"] = sorted(api.list_repo_files("user/revisions"))
        print(json.dumps(out))
    """, env, folder)
    assert result["unchanged"] == result["first"] != result["second"]  # an unchanged upload makes no commit
    assert result["main"] == "two" == result["at_second"]
    assert result["at_first"] == result["short"] == result["branch"] == result["tag"] == "one"
    assert result["old_snapshot"] == [".gitattributes", "value.txt"]
    assert result["new_snapshot"] == [".gitattributes", "added.txt", "value.txt"]
    assert result["history"] == ["two", "one", "initial commit"]
    assert result["stable_history"][0] == result["first"] and len(result["stable_history"]) == 2
    assert ("stable", result["first"]) in [tuple(b) for b in result["branches"]]
    assert result["tags"] == [["v1", result["first"]]]
    assert result["info_at_first"] == result["first"]
    assert result["revision_exists"] == [True, False] and result["missing_revision"]
    assert (result["stable_after"], result["main_after"]) == ("three", "two")
    assert result["stale_parent"] == 412
    assert result["after_delete"] == [".gitattributes", "value.txt"]
    assert hub.read("user/revisions", "value.txt", revision=result["first"]) == b"one"


def test_tree_listing_pages(tmp_path):
    with HubServer(page_size=3) as small_pages:
        folder = tmp_path / "many"
        (folder / "sub").mkdir(parents=True)
        for index in range(5):
            (folder / f"file{index}.txt").write_text(str(index))
            (folder / "sub" / f"inner{index}.txt").write_text(str(index))
        result = client("""
            import json, sys
            from huggingface_hub import HfApi
            api = HfApi()
            api.create_repo("user/paged")
            api.upload_folder(repo_id="user/paged", folder_path=sys.argv[1], commit_message="many")
            print(json.dumps({"all": sorted(api.list_repo_files("user/paged")),
                              "top": sorted(e.path for e in api.list_repo_tree("user/paged"))}))
        """, small_pages.client_env(tmp_path / "hf_home"), folder)
        assert len(result["all"]) == 11 and "sub/inner4.txt" in result["all"]
        assert len(result["top"]) == 7 and "sub" in result["top"]
        assert any(path.startswith("/api/models/user/paged/tree/") and "cursor=" in path
                   for _, path, _ in small_pages.requests)


def test_fault_injection_and_outage(tmp_path):
    script = """
        import json, sys
        from huggingface_hub import HfApi
        api = HfApi()
        out = []
        for name in sys.argv[1:]:
            try:
                out.append(str(api.create_repo(name, exist_ok=True)))
            except Exception as error:
                status = getattr(getattr(error, "response", None), "status_code", None)
                out.append(f"{type(error).__name__}:{status}")
        print(json.dumps(out))
    """
    with HubServer() as flaky:
        flaky_env = flaky.client_env(tmp_path / "hf_home")
        flaky.fail_with = 500
        assert client(script, flaky_env, "user/a") == ["HfHubHTTPError:500"]
        assert not flaky.repo_exists("user/a")
        flaky.fail_with = None
        flaky.inject_failures(503, count=1, path=r"^/api/repos/create$")
        assert client(script, flaky_env, "user/a", "user/a") == ["HfHubHTTPError:503", f"{flaky.url}/user/a"]
        port = flaky.port
        flaky.stop()
        assert client(script, flaky_env, "user/b")[0].startswith("ConnectError")
        flaky.start()  # same port, same repositories
        assert flaky.port == port
        assert client(script, flaky_env, "user/a", "user/b") == [f"{flaky.url}/user/a", f"{flaky.url}/user/b"]
