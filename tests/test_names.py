"""Published names: [names] templates checked by `tilepipe check`, taken from opticstream's
name formats by `import-opticstream`, and the upload options that use them."""

from __future__ import annotations

import pytest

from services.core.errors import ConfigError, ImportRefused
from services.core.manifest import dump_manifest, load_manifest
from services.core.tomlio import to_toml
from services.io.atomic import write_atomically
from services.local.simulate import small_manifest, write_manifest
from services.ops.opticstream_import import build_manifest
from services.ops.preflight import run_checks
from services.runtime.options import parse_options
from services.stages.upload import UploadOptions
from tests.conftest import tilepipe


def manifest_with(tmp_path, config, **names):
    """A two-illumination manifest under the raw root with `names` as its [names] table."""
    manifest = small_manifest("brain01", slices=2, rows=2, cols=3, mosaics=2)
    path = write_manifest(manifest, config.roots.raw / "brain01")
    data = {**manifest.model_dump(mode="json"), "names": names}
    write_atomically(path, to_toml(data))
    return path


def failure(path, config) -> str:
    (first, *_) = run_checks(path, config)
    assert first.name == "manifest valid" and not first.ok
    return first.detail


def test_check_names_the_bad_template(tmp_path, config):
    unknown = manifest_with(tmp_path, config, mosaic="{project}_{stain}.ome.zarr")
    result = tilepipe("check", str(unknown), config=config)
    assert result.returncode != 0
    assert "[names] mosaic" in result.stdout and "unknown fields ['stain']" in result.stdout

    cases = {
        "positional": ({"slice_axis": "{project}_{}.nii.gz"}, "[names] slice_axis", "positional"),
        "attribute": ({"volume": "{project.upper}.ome.zarr"}, "[names] volume", "plain field"),
        "extension": (
            {"raw_archive": "{project}_{slice}_{tile}_{acq}.nii"},
            "raw_archive",
            ".nii.gz",
        ),
        "unsafe": ({"axis": "{project}/slice{slice}.ome.zarr"}, "[names] axis", "unsafe name"),
        "dots": ({"volume": "..{project}.ome.zarr"}, "[names] volume", "unsafe name"),
        "within": (
            {"raw_archive": "{project}_sample-slice{slice:02d}_acq-{acq}_OCT.nii.gz"},
            "raw_archive (slice=1, tile=1",
            "both get the name 'brain01_sample-slice01_acq-normal_OCT.nii.gz'",
        ),
        "between": (
            {"mosaic_mask": "{project}_sample-slice{slice:02d}_acq-{acq}_proc-ret_OCT.nii.gz"},
            "mosaic_enface (slice=1, mosaic=0, modality=ret, acq=normal) and mosaic_mask",
            "[names] mosaic_mask",
        ),
        "project": ({"project": "my brain"}, "names.project", "pattern"),
        "subject": ({"subject": "brain_01"}, "names.subject", "pattern"),
    }
    for case, (names, where, what) in cases.items():
        detail = failure(manifest_with(tmp_path, config, **names), config)
        assert where in detail and what in detail, (case, detail)


def test_check_shows_the_names_a_good_manifest_gives(tmp_path, config):
    path = manifest_with(tmp_path, config, project="LINC-brain01", subject="B01")
    result = tilepipe("check", str(path), config=config)
    line = next(x for x in result.stdout.splitlines() if "published names" in x)
    # the first tile of slice 1 in the column snake from the bottom left: row 1, tile 1
    assert "LINC-brain01_sample-slice01_chunk-0001_acq-normal_OCT.nii.gz" in line
    assert "sub-B01" in line and line.startswith("[ok]")
    manifest = load_manifest(path)
    from messages.events import TileCoord

    top_right = TileCoord(slice=1, mosaic=1, row=0, col=2)  # 6th tile of the snake
    assert manifest.published_name("raw_archive", tile=top_right) == (
        "LINC-brain01_sample-slice02_chunk-0006_acq-tilted_OCT.nii.gz"
    )
    assert manifest.published_name("mosaic_enface", slice_index=0, mosaic=1, modality="biref") == (
        "LINC-brain01_sample-slice01_acq-tilted_proc-biref_OCT.nii.gz"
    )


def test_import_opticstream_takes_its_name_formats(tmp_path):
    scan = {
        "project_name": "LINC 0001",
        "acquisition": {"grid_size_x_normal": 2, "grid_size_x_tilted": 2, "grid_size_y": 2},
        "archive_tile_name_format": "{project_name}_s{slice_id:03d}_t{tile_id:05d}_{acq}.nii.gz",
        "slice_registered_format": "{project_name}_sample-slice{slice_id:04d}_3d.nii.gz",
    }
    kw = {"wave_pixel_mat": "c.mat", "dispersion_file": None, "slices": 1, "first_slice": 7}
    report = build_manifest(scan, **kw)
    m = report.manifest
    assert m.names.raw_archive == "{project}_s{slice:03d}_t{tile:05d}_{acq}.nii.gz"
    assert not any("archive_tile_name_format" in note for note in report.notes)
    from messages.events import TileCoord

    tile = TileCoord(slice=0, mosaic=1, row=1, col=0)  # bottom left: the first tile
    assert m.published_name("raw_archive", tile=tile) == "LINC-0001_s007_t00001_tilted.nii.gz"
    assert m.published_name("slice_axis", slice_index=0) == "LINC-0001_sample-slice0007_3d.nii.gz"
    written = tmp_path / "manifest.toml"
    write_atomically(written, dump_manifest(m))
    assert load_manifest(written).names == m.names  # round trip through TOML

    for fmt, why in (
        ("{project_name}_{slice_id}.nii.gz", "both get the name"),
        ("{project_name}_{stain}_{slice_id}_{tile_id}_{acq}.nii.gz", "unknown fields"),
        ("{project_name}_{slice_id}_{tile_id}_{acq}.tar", "must end with .nii.gz"),
    ):
        with pytest.raises(ImportRefused, match="raw_archive") as refused:
            build_manifest({**scan, "archive_tile_name_format": fmt}, **kw)
        assert why in str(refused.value)


def test_upload_layout_options_are_checked():
    base = {"url": "file:///tmp/x"}
    for bad, why in (
        ({"layout": "dandi", "key_template": "{acq}/{name}"}, "no key_template"),
        ({"layout": "dandi", "include_raw": True}, "no include_raw"),
        ({"delete_raw_after_verified_upload": True}, "needs archive_raw"),
        ({"layout": "bids"}, "layout"),
        ({"archive_raw": True, "archive_level": 0}, "archive_level"),
    ):
        with pytest.raises(ConfigError, match=why):
            parse_options(UploadOptions, {**base, **bad}, "upload")
    options = parse_options(UploadOptions, {**base, "archive_raw": True}, "upload")
    assert options.layout == "tilepipe" and not options.delete_raw_after_verified_upload
