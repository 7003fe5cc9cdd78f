"""The real server, started through the console command on a free loopback port: a collection built over HTTP,
an edited copy found first and flagged, a photo not in the collection not flagged, a SIGKILL that loses nothing
acknowledged, a clean stop."""
from __future__ import annotations

import signal

import httpx

from pair_vit.serve.process import ServerProcess

TOKEN = "e2e-token"


def test_build_match_kill_restart(tmp_path, photos, cat_bytes):
    collection, token_file = tmp_path / "collection", tmp_path / "token"
    token_file.write_text(TOKEN)
    args = ["--token-file", str(token_file), "--num-workers", "0", "--log-level", "warning"]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with ServerProcess(collection, args) as server:
        http = httpx.Client(base_url=server.url, timeout=300)
        assert http.get("/health").json()["references"] == 0
        refused = http.post("/references", files=[("image", (photos[0].name, photos[0].read_bytes()))])
        assert refused.status_code == 401
        added = http.post("/references", headers=auth, files=[
            ("image", (p.name, p.read_bytes(), "image/jpeg")) for p in photos[:6]])
        assert added.status_code == 200 and len(added.json()["added"]) == 6
        found = http.post("/match", data={"k": "3"}, files=[("image", ("cat.jpg", cat_bytes, "image/jpeg")),
                                                             ("image", ("china.jpg", photos[6].read_bytes()))])
        rows = found.json()["matches"]
        cat = [r for r in rows if r["query_id"] == "cat"]
        assert cat[0]["reference_id"] == "chelsea" and cat[0]["is_copy"]
        assert not any(r["is_copy"] for r in rows if r["query_id"] == "china")
        assert http.delete(f"/references/{photos[0].stem}", headers=auth).status_code == 200
        server.kill()  # right after the acknowledgement: nothing may be lost
    assert server.process.returncode == -9
    with ServerProcess(collection, args) as again:
        listed = httpx.get(again.url + "/references", timeout=60).json()
        assert sorted(listed["ids"]) == sorted(p.stem for p in photos[1:6])
        # SIGTERM: uvicorn finishes and exits by re-raising the signal (-15), in time (no SIGKILL: -9)
        assert again.stop() in (0, -signal.SIGTERM)
