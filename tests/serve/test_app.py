"""The routes with Starlette's test client over a small saved collection: every route, the auth rules, every
bad-input case (a 4xx JSON error, nothing changed, the server still serving), saves before acknowledging."""
from __future__ import annotations

import io
import json
import os
import struct
import zlib

import pytest
from starlette.testclient import TestClient

from pair_vit.match.store import ReferenceStore
from pair_vit.serve import ServeConfig, build

FAST = {"num_workers": 0}
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMITS = {"max_request_mb": 0.25, "max_files": 3, "max_pixels": 4_000_000, "default_k": 3}


@pytest.fixture(scope="module")
def served(saved, tmp_path_factory):
    """(client, folder): one app for the module over a copy of the saved collection, a token required."""
    import shutil

    folder = tmp_path_factory.mktemp("app") / "collection"
    shutil.copytree(saved, folder)
    token_file = folder.parent / "token.txt"
    token_file.write_text(TOKEN + "\n")
    app = build(str(folder), ServeConfig(token_file=str(token_file), **LIMITS), FAST)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, folder


def image_part(name: str, content: bytes) -> tuple:
    return ("image", (name, content, "image/jpeg"))


def saved_ids(folder) -> list[str]:
    """The reference ids of the last save in `folder`, read from disk (no models loaded)."""
    store = ReferenceStore.open(folder)
    try:
        return list(store.sources)
    finally:
        store.close()


def bomb_png(width: int, height: int) -> bytes:
    """A few hundred bytes of PNG whose header claims width x height pixels (a decompression bomb)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def test_health_and_listing(served, photos):
    client, _ = served
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["references"] == 6 and 0 < health["threshold"] < 1
    assert set(health["weights"]) == {"descriptor", "pair"} and all(len(w["fingerprint"]) > 8
                                                                     for w in health["weights"].values())
    everything = client.get("/references").json()["ids"]
    assert sorted(everything) == sorted(p.stem for p in photos[:6])
    listed = client.get("/references", params={"offset": 1, "limit": 2}).json()
    assert listed == {"total": 6, "offset": 1, "limit": 2, "ids": everything[1:3]}
    assert client.get("/references", params={"offset": 6}).json()["ids"] == []


def test_match_finds_the_edited_copy_first(served, photos, cat_bytes):
    client, _ = served
    response = client.post("/match", files=[image_part("cat.jpg", cat_bytes),
                                             image_part("china.jpg", photos[6].read_bytes())], data={"k": "2"})
    assert response.status_code == 200
    found = response.json()
    assert found["skipped"] == {} and "correspondences" not in found
    rows = {q: [m for m in found["matches"] if m["query_id"] == q] for q in ("cat", "china")}
    assert [len(r) for r in rows.values()] == [2, 2]
    assert rows["cat"][0]["reference_id"] == "chelsea" and rows["cat"][0]["is_copy"]
    assert rows["cat"][0]["score"] > rows["cat"][1]["score"]  # best first
    assert not any(m["is_copy"] for m in rows["china"]) and found["threshold"] == pytest.approx(
        client.get("/health").json()["threshold"])
    everything = client.post("/match", files=[image_part("china.jpg", photos[6].read_bytes())],
                             params={"threshold": "0"}).json()
    assert len(everything["matches"]) == 3 and all(m["is_copy"] for m in everything["matches"])  # default_k=3


def test_match_with_correspondences(served, photos, cat_bytes):
    client, _ = served
    found = client.post("/match?correspondences=1&k=2", files=[image_part("cat.jpg", cat_bytes)]).json()
    explained = found["correspondences"]["cat"]
    gh, gw = explained["grid"]
    assert set(explained["candidates"]) == {m["reference_id"] for m in found["matches"]}
    copy, other = (explained["candidates"][m["reference_id"]] for m in found["matches"])
    assert len(copy["similarity"]) == gh * gw
    assert all(0 <= v <= 1 for pair in copy["pairs"] for v in pair[:4])
    # the copy's tokens find their match in the reference more often than a look-alike's do
    assert len(copy["pairs"]) > len(other["pairs"])
    assert sum(copy["similarity"]) > sum(other["similarity"])


def test_reference_image(served):
    client, _ = served
    response = client.get("/references/chelsea/image")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.content.startswith(b"\xff\xd8")  # a JPEG thumbnail, longest side 160, aspect kept
    from PIL import Image

    thumb = Image.open(io.BytesIO(response.content))
    assert max(thumb.size) == 160 and thumb.size[0] > thumb.size[1]  # chelsea is landscape
    assert client.get("/references/nope/image").status_code == 404


def test_add_saves_before_acknowledging_then_remove(served, photos, cat_bytes):
    client, folder = served
    files = [image_part("china.jpg", photos[6].read_bytes())]
    added = client.post("/references", files=files, headers=AUTH)
    assert added.status_code == 200
    assert added.json() == {"added": ["china"], "already": [], "skipped": {}, "references": 7}
    assert "china" in saved_ids(folder)  # on disk when acknowledged
    again = client.post("/references", files=files, headers=AUTH).json()
    assert again["added"] == [] and again["already"] == ["china"]
    other_bytes = client.post("/references", files=[image_part("china.jpg", cat_bytes)], headers=AUTH)
    assert other_bytes.status_code == 409 and "china" in other_bytes.json()["error"]
    top = client.post("/match", files=files).json()["matches"][0]
    assert top["reference_id"] == "china" and top["is_copy"]

    removed = client.delete("/references/china", headers=AUTH)
    assert removed.status_code == 200 and removed.json() == {"removed": "china", "references": 6}
    assert "china" not in saved_ids(folder)
    assert not (folder / ".uploads").exists()  # staging emptied
    gone = client.delete("/references/china", headers=AUTH)
    assert gone.status_code == 404 and "china" in gone.json()["error"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                                     {"Authorization": f"Basic {TOKEN}"}])
def test_writes_need_the_token_and_change_nothing_without_it(served, photos, headers):
    client, folder = served
    saved_before = (folder / "references.sqlite").read_bytes()
    add = client.post("/references", files=[image_part("china.jpg", photos[6].read_bytes())], headers=headers)
    remove = client.delete("/references/chelsea", headers=headers)
    for response in (add, remove):
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert "Bearer" in response.json()["error"]
    assert client.get("/health").json()["references"] == 6
    assert (folder / "references.sqlite").read_bytes() == saved_before
    assert client.post("/match", files=[image_part("x.jpg", photos[0].read_bytes())]).status_code == 200  # open


BAD_UPLOADS = {  # name: (files, status, words the error must contain)
    "empty": ([image_part("a.jpg", b"")], 400, "empty"),
    "not an image": ([image_part("a.jpg", b"%PDF-1.4 not an image")], 400, "not an image"),
    "truncated": (None, 400, "'a'"),
    "bomb": ([image_part("a.png", bomb_png(30000, 30000))], 413, "too large"),
    "oversized body": ([image_part("a.jpg", os.urandom(300_000))], 413, "limit"),
    "too many files": ([image_part(f"{n}.jpg", b"x") for n in range(4)], 400, "files"),
    "text instead of a file": (None, 400, "text field"),
    "no image field": ([("picture", ("a.jpg", b"x", "image/jpeg"))], 400, "'image'"),
    "same id twice": (None, 400, "same"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
@pytest.mark.parametrize("route", ["/match", "/references"])
def test_bad_uploads_get_a_4xx_naming_the_problem(served, photos, case, route):
    client, folder = served
    files, status, words = BAD_UPLOADS[case]
    good = photos[6].read_bytes()
    data = None
    if case == "truncated":
        files = [image_part("a.jpg", good[:len(good) // 3])]
    elif case == "text instead of a file":
        files, data = [image_part("b.jpg", good)], {"image": "hello"}
    elif case == "same id twice":
        files = [image_part("a.jpg", good), image_part("a.png", good)]
        words = "'a'"
    response = client.post(route, files=files, data=data, headers=AUTH)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]
    assert client.get("/health").json()["references"] == 6  # nothing added, still serving


def test_bad_parameters_and_requests(served, photos):
    client, _ = served
    files = [image_part("a.jpg", photos[0].read_bytes())]
    for params, words in [({"k": "0"}, "k must be"), ({"k": "two"}, "k must be an integer"),
                          ({"threshold": "nan"}, "threshold"), ({"threshold": "1.5"}, "threshold")]:
        response = client.post("/match", files=files, params=params)
        assert response.status_code == 400 and words in response.json()["error"], params
    for params in ({"offset": "-1"}, {"limit": "0"}, {"limit": "100000"}, {"offset": "x"}):
        assert client.get("/references", params=params).status_code == 400
    not_multipart = client.post("/match", content=b"{}", headers={"content-type": "application/json"})
    assert not_multipart.status_code == 415 and "multipart" in not_multipart.json()["error"]
    unnamed = client.post("/references", files=[image_part("../bad name!.jpg", photos[0].read_bytes())],
                          headers=AUTH)
    assert unnamed.status_code == 400 and "reference id" in unnamed.json()["error"]
    assert client.get("/nowhere").status_code == 404 and "error" in client.get("/nowhere").json()
    assert client.put("/match").status_code == 405


def test_the_page_and_its_assets_are_served(served):
    client, _ = served
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'name="viewport"' in page.text and 'id="file"' in page.text
    for asset in ("static/review.js", "static/review.css"):
        assert asset in page.text and client.get(f"/{asset}").status_code == 200


def test_an_empty_collection_is_built_over_http(tmp_path, photos):
    client = TestClient(build(str(tmp_path / "new"), ServeConfig(), FAST))
    assert client.get("/health").json()["references"] == 0
    empty = client.post("/match", files=[image_part("a.jpg", photos[0].read_bytes())])
    assert empty.status_code == 409 and "empty" in empty.json()["error"]
    added = client.post("/references", files=[image_part(p.name, p.read_bytes()) for p in photos[4:6]]).json()
    assert sorted(added["added"]) == ["chelsea", "rocket"]  # no token file: writes are open
    assert sorted(saved_ids(tmp_path / "new")) == ["chelsea", "rocket"]
    assert json.loads(client.get("/references").text)["total"] == 2
