"""Evidence cache keys: the identity of the weights a backbone names (a local checkpoint's size,
mtime and sha256, a model directory, a hub model's resolved commit) is part of the key."""

from __future__ import annotations

import os
from types import SimpleNamespace

import search.core.cache as cache_mod
from search.core.cache import evidence_key, weights_identity


def _key(backbone, settings=None):
    from search.core.trial import settings_key

    ctx = SimpleNamespace(backbone=backbone, settings=settings or {}, classes={"names": ["a"]})
    return evidence_key("img", "m", settings_key(ctx), version="v")


def test_replacing_the_checkpoint_at_the_same_path_changes_the_key(tmp_path, monkeypatch):
    ckpt = tmp_path / "clip.safetensors"
    ckpt.write_bytes(b"weights-1" * 100)
    spec = {"name": "b", "model": "ViT-B-16", "path": str(ckpt)}
    hashed = []
    real = cache_mod.file_hash
    monkeypatch.setattr(cache_mod, "file_hash", lambda p: hashed.append(p) or real(p))
    k1 = _key(spec)
    assert _key(spec) == k1 and _key(dict(spec)) == k1       # nothing touched: same key
    assert len(hashed) == 1                                  # hashed once per process
    st = ckpt.stat()
    replacement = tmp_path / "new.safetensors"
    replacement.write_bytes(b"weights-2" * 100)              # same size, other content
    os.replace(replacement, ckpt)
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))      # even with the old mtime
    assert ckpt.stat().st_size == st.st_size and ckpt.stat().st_mtime_ns == st.st_mtime_ns
    k2 = _key(spec)
    assert k2 != k1 and len(hashed) == 2
    ckpt.write_bytes(b"weights-1" * 100)                     # the old bytes back, new mtime
    assert _key(spec) != k2


def test_a_local_model_directory_and_a_sam_checkpoint_are_in_the_key(tmp_path):
    d = tmp_path / "llava"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"x" * 64)
    sam = tmp_path / "sam.pth"
    sam.write_bytes(b"s" * 64)
    spec = {"name": "b", "model": "llava-hf/llava-1.5-7b-hf", "path": str(d),
            "sam_checkpoint": str(sam)}
    k1 = _key(spec)
    ident = weights_identity(spec)
    assert set(ident["path"]["files"]) == {"config.json", "model.safetensors"}
    assert "model" not in ident                 # the local path overrides the hub id
    (d / "model.safetensors").write_bytes(b"y" * 64)
    k2 = _key(spec)
    sam.write_bytes(b"t" * 64)
    k3 = _key(spec)
    assert len({k1, k2, k3}) == 3
    settings_ckpt = tmp_path / "presence.bin"
    settings_ckpt.write_bytes(b"p")
    k4 = _key(spec, {"presence_path": str(settings_ckpt)})
    settings_ckpt.write_bytes(b"q")
    assert _key(spec, {"presence_path": str(settings_ckpt)}) != k4


def _fake_hub_cache(root, repo, commit, ref="main"):
    refs = root / ("models--" + repo.replace("/", "--")) / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / ref).write_text(commit)


def test_hub_models_are_keyed_by_the_resolved_commit(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    hub = {"name": "b", "arch": "llava", "model": "llava-hf/llava-1.5-7b-hf"}
    unresolved = _key(hub)
    assert weights_identity(hub)["model"]["commit"] is None
    _fake_hub_cache(tmp_path, "llava-hf/llava-1.5-7b-hf", "a" * 40)
    k_a = _key(hub)
    assert weights_identity(hub)["model"] == {"hub": "llava-hf/llava-1.5-7b-hf",
                                              "revision": "main", "commit": "a" * 40}
    _fake_hub_cache(tmp_path, "llava-hf/llava-1.5-7b-hf", "b" * 40)   # main moved on
    k_b = _key(hub)
    assert len({unresolved, k_a, k_b}) == 3
    pinned = {**hub, "revision": "c" * 40}
    assert weights_identity(pinned)["model"]["commit"] == "c" * 40
    # open_clip pretrained tags: the commit of the tag's hub repo.
    clip = {"name": "c", "model": "ViT-B-16-quickgelu", "pretrained": "openai"}
    repo = weights_identity(clip)["model"]["hub"]
    assert repo == "timm/vit_base_patch16_clip_224.openai"
    k_clip = _key(clip)
    _fake_hub_cache(tmp_path, repo, "d" * 40)
    assert weights_identity(clip)["model"]["commit"] == "d" * 40 and _key(clip) != k_clip


def test_tiny_backbones_have_no_files():
    assert weights_identity({"name": "tiny", "tiny": {"width": 64}}) == {}
    assert weights_identity({"name": "tiny"}) == {}


def test_clipseg_second_vision_models_are_in_the_key(tmp_path, monkeypatch):
    """The weights of the vision models a clipseg search extracts (settings.vision, .sam) are
    in the key; an entry no search extracts is not."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    sam = tmp_path / "sam_vit_b.pth"
    sam.write_bytes(b"s" * 64)
    models = {"dino": {"arch": "dino", "model": "facebook/dino-vitb8"},
              "sam": {"arch": "sam", "path": str(sam)},
              "unused": {"arch": "dino", "path": str(tmp_path / "nowhere")}}
    spec = {"name": "b", "model": "ViT-B-16-quickgelu", "pretrained": "openai"}
    settings = {"vision": ["dino"], "sam": "sam", "vision_models": models}
    ident = weights_identity(settings)["vision_models"]
    assert set(ident) == {"dino", "sam"}
    assert ident["dino"]["model"]["hub"] == "facebook/dino-vitb8"
    k1 = _key(spec, settings)
    _fake_hub_cache(tmp_path, "facebook/dino-vitb8", "e" * 40)       # the hub model moved on
    k2 = _key(spec, settings)
    sam.write_bytes(b"t" * 64)                                      # new SAM weights, same path
    k3 = _key(spec, settings)
    assert len({k1, k2, k3}) == 3
