"""Multiscale OME-Zarr (NGFF 0.5) writer: validity (ome-zarr-models), pyramid, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import ome_zarr_models
import pytest
import zarr
from ome_zarr_models.v05.image import Image

from services.io import atomic
from services.io.omezarr import downsample, open_level, pyramid, read_multiscale, write_omezarr

pytestmark = pytest.mark.unit

PRODUCTS = ("aip", "mip", "retardance", "orientation")


def products(shape=(600, 1000), seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {
        "aip": rng.normal(50, 5, shape),
        "mip": rng.normal(70, 5, shape),
        "retardance": rng.uniform(0, 90, shape),
        "orientation": rng.uniform(-90, 90, shape),
    }
    for v in out.values():
        v[:7, :13] = np.nan  # a hole (no tile there)
    return {k: v.astype(np.float32) for k, v in out.items()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_store_validates_as_ngff_05_image(tmp_path):
    path = tmp_path / "slice_003.ome.zarr"
    res = write_omezarr(
        path, products(), pixel_size_um=(2.5, 3.0), origin_um=(100.0, -40.0), chunk=128, shard=256
    )
    assert res.written and res.path == path
    assert res.shapes == ((4, 600, 1000), (4, 300, 500), (4, 150, 250))  # until a side <= 256

    group = zarr.open_group(str(path), mode="r")
    model = Image.from_zarr(group)  # raises if the metadata or arrays are not NGFF 0.5
    assert isinstance(ome_zarr_models.open_ome_zarr(group), Image)
    assert model.ome_zarr_version == "0.5"
    ms = model.ome_attributes.multiscales[0]
    assert [(a.name, a.type, a.unit) for a in ms.axes] == [
        ("c", "channel", None),
        ("y", "space", "micrometer"),
        ("x", "space", "micrometer"),
    ]
    raw = json.loads((path / "zarr.json").read_text())
    assert raw["zarr_format"] == 3 and raw["attributes"]["ome"]["version"] == "0.5"
    for k, ds in enumerate(raw["attributes"]["ome"]["multiscales"][0]["datasets"]):
        f = 2**k
        scale, translation = ds["coordinateTransformations"]
        assert scale == {"type": "scale", "scale": [1.0, 2.5 * f, 3.0 * f]}
        expected = [0.0, 100.0 + (f - 1) * 2.5 / 2, -40.0 + (f - 1) * 3.0 / 2]
        assert translation["type"] == "translation"
        assert translation["translation"] == pytest.approx(expected)
        arr = group[ds["path"]]
        assert arr.metadata.dimension_names == ("c", "y", "x")
        assert arr.dtype == np.float32 and np.isnan(arr.metadata.fill_value)
        assert arr.chunks == (1, min(128, arr.shape[1]), min(128, arr.shape[2]))
        assert arr.shards is not None and arr.shards[0] == 1 and arr.shards[1] % arr.chunks[1] == 0
    labels = [c["label"] for c in raw["attributes"]["ome"]["omero"]["channels"]]
    assert labels == list(PRODUCTS)


def test_reader_round_trip(tmp_path):
    data = products((300, 420), seed=1)
    path = tmp_path / "s.ome.zarr"
    write_omezarr(path, data, pixel_size_um=(1.0, 1.0), attributes={"slice": 3})
    arr = open_level(path)
    assert arr.shape == (4, 300, 420)
    np.testing.assert_array_equal(arr[:], np.stack([data[k] for k in PRODUCTS]))
    meta = read_multiscale(path)
    assert meta["channel_names"] == list(PRODUCTS)
    assert meta["multiscales"][0]["metadata"]["axial_channels"] == ["orientation"]
    assert open_level(path, 1).shape == (4, 150, 210)
    assert zarr.open_group(str(path), mode="r").attrs["tilepipe"]["slice"] == 3
    # a single 2-D image gets a channel axis of length 1
    write_omezarr(tmp_path / "one.ome.zarr", data["aip"])
    assert open_level(tmp_path / "one.ome.zarr").shape == (1, 300, 420)


def test_downsampling_is_nan_aware_and_circular_for_angles():
    img = np.array(
        [
            [[1.0, 3.0, 5.0], [np.nan, 2.0, np.nan], [7.0, 9.0, 4.0]],
            [[89.0, -89.0, 10.0], [-89.0, 89.0, 20.0], [0.0, 0.0, np.nan]],
        ]
    )
    out = downsample(img, axial=[False, True])
    assert out.shape == (2, 2, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], [[2.0, 5.0], [8.0, 4.0]])  # NaNs ignored, odd edge
    assert abs(abs(out[1, 0, 0]) - 90.0) < 1e-4  # circular mean of +-89: 90, not 0
    assert out[1, 0, 1] == pytest.approx(15.0)
    assert -90.0 <= out[1, 0, 0] < 90.0
    assert np.isnan(downsample(np.full((1, 2, 2), np.nan))).all()
    levels = pyramid(np.zeros((1, 1030, 700)), min_size=256)
    assert [lv.shape[1:] for lv in levels] == [(1030, 700), (515, 350), (258, 175)]


def test_identical_store_is_left_alone_and_changes_replace_it(tmp_path):
    path = tmp_path / "s.ome.zarr"
    data = products((200, 300))
    first = write_omezarr(path, data)
    stamp = (path / "zarr.json").stat().st_mtime_ns
    again = write_omezarr(path, data)
    assert not again.written and again.content_sha256 == first.content_sha256
    assert (path / "zarr.json").stat().st_mtime_ns == stamp
    data["aip"][10, 10] = 123.0
    third = write_omezarr(path, data)
    assert third.written and third.content_sha256 != first.content_sha256
    assert open_level(path)[0, 10, 10] == 123.0
    assert leftovers(tmp_path) == []
    # metadata changes count too
    assert write_omezarr(path, data, pixel_size_um=(2.0, 2.0)).written


def test_replacement_without_atomic_exchange(tmp_path, monkeypatch):
    path = tmp_path / "s.ome.zarr"
    write_omezarr(path, products((100, 100), seed=1))
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    write_omezarr(path, products((100, 100), seed=2))
    np.testing.assert_array_equal(open_level(path)[0], products((100, 100), seed=2)["aip"])
    assert leftovers(tmp_path) == []


def test_failed_write_leaves_previous_store(tmp_path, monkeypatch):
    path = tmp_path / "s.ome.zarr"
    old = products((100, 120), seed=1)
    write_omezarr(path, old)

    def boom(root):
        raise RuntimeError("disk full")

    monkeypatch.setattr(atomic, "fsync_tree", boom)
    with pytest.raises(RuntimeError):
        write_omezarr(path, products((100, 120), seed=2))
    np.testing.assert_array_equal(open_level(path)[0], old["aip"])
    assert leftovers(tmp_path) == []  # the temporary store was removed
    with pytest.raises(RuntimeError):
        write_omezarr(tmp_path / "new.ome.zarr", old)
    assert not (tmp_path / "new.ome.zarr").exists()


def test_hard_crash_never_exposes_a_partial_store(tmp_path, monkeypatch):
    """A crash with no clean-up (simulated: no rmtree) leaves only a hidden .tmp- directory."""
    monkeypatch.setattr(atomic, "fsync_tree", lambda root: (_ for _ in ()).throw(SystemExit))
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(SystemExit):
        write_omezarr(tmp_path / "s.ome.zarr", products((64, 64)))
    assert not (tmp_path / "s.ome.zarr").exists()
    assert [n.split(".tmp-")[0] for n in leftovers(tmp_path)] == [".s.ome.zarr"]


def test_refuses_to_replace_something_that_is_not_a_store(tmp_path):
    target = tmp_path / "s.ome.zarr"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        write_omezarr(target, products((64, 64)))
    assert (target / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError):
        write_omezarr(tmp_path / "x.ome.zarr", np.zeros((2, 8, 8)), channel_names=["a"])
