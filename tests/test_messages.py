"""Event models, subjects, safe paths and decoding."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from messages import (
    EVENT_TYPES,
    ArtifactUploaded,
    InvalidEvent,
    PathEscapeError,
    SliceStitched,
    StageFailed,
    Subject,
    SubjectMismatch,
    TileArrived,
    TileConverted,
    TileCoord,
    TilePairAligned,
    TileProcessed,
    check_subject,
    decode_event,
    event_filter,
    json_schemas,
    parse_subject,
    resolve_in_root,
    subject,
    utcnow,
)
from messages.subjects import event_subjects


def tile_event(**over) -> TileArrived:
    fields = {
        "acq": "A1",
        "tile": TileCoord(slice=3, mosaic=1, row=2, col=4),
        "path": "s3/tile.nii",
        "manifest": "manifest.toml",
        "size_bytes": 10,
        "completed_at": utcnow(),
    }
    return TileArrived(**{**fields, **over})


@pytest.mark.unit
def test_subject_scheme_filters_by_acquisition_and_slice():
    event = tile_event()
    assert event.subject() == "tp.tile_arrived.A1.3.m1-r2-c4"
    assert event_filter("tile_arrived") == "tp.tile_arrived.>"
    assert event_filter("tile_arrived", "A1", 3) == "tp.tile_arrived.A1.3.*"
    stitched = SliceStitched(acq="A1", slice=3, mosaic=1, path="m/s3.ome.zarr")
    assert stitched.subject() == "tp.slice_stitched.A1.3.m1"


@pytest.mark.unit
@pytest.mark.parametrize("token", ["a.b", "*", ">", "", "x y", "a" * 65, "acq\n", "\nacq"])
def test_subject_tokens_cannot_smuggle_wildcards(token):
    with pytest.raises(ValueError, match="invalid subject token"):
        subject("tile_arrived", token)


@pytest.mark.unit
def test_msg_id_is_stable_per_work_item():
    a, b = tile_event(), tile_event(size_bytes=99)
    assert a.msg_id() == b.msg_id()
    assert a.msg_id() != tile_event(tile=TileCoord(slice=3, row=2, col=5)).msg_id()


@pytest.mark.unit
def test_recomputed_outputs_have_new_ids_the_same_work_the_same():
    tile = TileCoord(slice=3, mosaic=1, row=2, col=4)
    made = [
        lambda basis: TileConverted(
            acq="A1", tile=tile, path="c", raw_path="r", shape=[2], dtype="u2", basis=basis
        ),
        lambda basis: TileProcessed(
            acq="A1", tile=tile, products={}, device="cpu", seconds=1.0, basis=basis
        ),
        lambda basis: TilePairAligned(
            acq="A1",
            slice=3,
            a=tile,
            b=tile,
            shift_px=(0, 0),
            confidence=1,
            accepted=True,
            basis=basis,
        ),
    ]
    for make in made:
        assert make("").msg_id() == make("").subject()
        assert make("b1").msg_id() == f"{make('').subject()}:b1" == make("b1").msg_id()
        assert make("b1").msg_id() != make("b2").msg_id()


def test_round_trip_every_kind_has_a_schema():
    schemas = json_schemas()
    assert set(schemas) == set(EVENT_TYPES)
    assert len(EVENT_TYPES) == 12
    event = tile_event()
    assert decode_event(event.to_json()) == event


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: {**d, "v": 2}, "unsupported_version"),
        (lambda d: {**d, "type": "nope"}, "unknown_type"),
        (lambda d: {**d, "acq": "a.b"}, "invalid_fields"),
        (lambda d: {**d, "path": "/etc/passwd"}, "invalid_fields"),
        (lambda d: {**d, "path": "a/../../b"}, "invalid_fields"),
        (lambda d: {**d, "extra": 1}, "invalid_fields"),
        (lambda d: {**d, "tile": {"slice": -1, "row": 0, "col": 0}}, "invalid_fields"),
    ],
)
@pytest.mark.unit
def test_decode_rejects_with_reason(mutate, reason):
    data = json.dumps(mutate(json.loads(tile_event().to_json()))).encode()
    with pytest.raises(InvalidEvent) as info:
        decode_event(data)
    assert info.value.reason == reason


@pytest.mark.unit
def test_decode_rejects_huge_and_unexpected():
    with pytest.raises(InvalidEvent, match="too_large"):
        decode_event(b" " * (300 * 1024))
    with pytest.raises(InvalidEvent, match="unexpected_type"):
        decode_event(tile_event().to_json(), accept={"tile_converted"})


@pytest.mark.unit
def test_resolve_in_root_refuses_escapes(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    assert resolve_in_root(root, "a/x.nii") == (root / "a" / "x.nii").resolve()
    os.symlink(tmp_path, root / "link")
    with pytest.raises(PathEscapeError):
        resolve_in_root(root, "link/secret")
    with pytest.raises(ValueError):
        resolve_in_root(root, "../x")


@pytest.mark.unit
def test_stage_failed_ids_distinguish_stages():
    common = {
        "acq": "A",
        "input_type": "tile_arrived",
        "input_subject": "s",
        "error": "e",
        "attempts": 1,
    }
    assert (
        StageFailed(stage="convert", **common).msg_id()
        != StageFailed(stage="process", **common).msg_id()
    )


@pytest.mark.unit
def test_upload_ids_tell_objects_and_contents_apart():
    """A slice's two mosaics and a re-upload of changed content are new events; the same
    object with the same content is a duplicate (JetStream drops it by its Nats-Msg-Id)."""

    def uploaded(key: str, checksum: str) -> ArtifactUploaded:
        return ArtifactUploaded(
            acq="A",
            slice=2,
            product="mosaic",
            source="A/m.ome.zarr",
            key=key,
            bytes=10,
            checksum=checksum,
            seconds=0.1,
        )

    normal = uploaded("A/mosaics/slice0002-m0.ome.zarr", "sha256:aa")
    assert normal.msg_id() == uploaded("A/mosaics/slice0002-m0.ome.zarr", "sha256:aa").msg_id()
    assert normal.msg_id() != uploaded("A/mosaics/slice0002-m1.ome.zarr", "sha256:aa").msg_id()
    assert normal.msg_id() != uploaded("A/mosaics/slice0002-m0.ome.zarr", "sha256:bb").msg_id()


def test_cli_schema_prints_json_schemas():
    out = subprocess.run(
        [sys.executable, "-m", "services.ops.cli", "schema"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert set(json.loads(out)) == set(EVENT_TYPES)
    bad = subprocess.run(
        [sys.executable, "-m", "services.ops.cli", "schema", "--kind", "x"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "unknown event kind" in bad.stderr


def failed_event(**over) -> StageFailed:
    fields = {
        "acq": "A1",
        "stage": "convert",
        "input_type": "tile_arrived",
        "input_subject": "tp.tile_arrived.A1.3.m1-r2-c4",
        "error": "e",
        "attempts": 1,
        "tile": TileCoord(slice=3, mosaic=1, row=2, col=4),
    }
    return StageFailed(**{**fields, **over})


@pytest.mark.unit
def test_failure_and_attempt_subjects_name_their_stage():
    """`tp.stage_failed.<acq>.<slice>.<tile>.<stage>`: permissions can allow a stage's user
    only failures in its own name, and `tp.stage_failed.>` still selects every failure."""
    failed = failed_event()
    assert failed.subject() == "tp.stage_failed.A1.3.m1-r2-c4.convert"
    assert parse_subject(failed.subject()) == Subject(
        "stage_failed", "A1", "3", "m1-r2-c4", "convert"
    )
    assert event_filter("stage_failed") == "tp.stage_failed.>"
    assert event_filter("stage_failed", "A1", stage="process") == "tp.stage_failed.A1.*.*.process"
    assert event_filter("stage_failed", "A1", 3) == "tp.stage_failed.A1.3.*.*"
    with pytest.raises(ValueError, match="need stage"):
        subject("attempt", "A1", "3", "m1-r2-c4")
    with pytest.raises(ValueError, match="take no stage"):
        subject("tile_arrived", "A1", "3", "m1-r2-c4", "convert")


@pytest.mark.unit
def test_a_parsed_subject_says_where_it_points_and_for_whom():
    failed = parse_subject(failed_event().subject())
    assert (failed.where(), failed.key(), failed.target) == (
        "A1.3.m1-r2-c4.convert",
        "3.m1-r2-c4",
        None,
    )
    arrived = parse_subject(tile_event().subject())
    assert (arrived.where(), arrived.target) == ("A1.3.m1-r2-c4", None)
    held = parse_subject("tp.hold_stitch.A1.3.m1-r2-c4")
    assert (held.kind, held.target, held.where()) == ("hold_stitch", "stitch", "A1.3.m1-r2-c4")
    assert parse_subject("tp.redo_convert.A1._._").target == "convert"


@pytest.mark.parametrize(
    "text",
    [
        "tp.stage_failed.A1.3.m1-r2-c4",  # a failure without its stage
        "tp.tile_arrived.A1.3.m1-r2-c4.convert",  # a stage where none belongs
        "tp.tile_arrived.A1.3",
        "xx.tile_arrived.A1.3.m1-r2-c4",
        "tp.tile_arrived.A1.3.m1-r2-c4\n",
        "tp.tile_arrived.A1.*.m1-r2-c4",
    ],
)
@pytest.mark.unit
def test_parse_subject_refuses_what_is_not_an_event_subject(text):
    with pytest.raises(ValueError, match="not an event subject"):
        parse_subject(text)
    good = "tp.attempt.A1.3.m1-r2-c4.convert"
    assert [s for s, _p in event_subjects([text, good])] == [good]  # the others skipped


@pytest.mark.unit
def test_an_event_must_be_what_its_subject_says():
    arrived, failed = tile_event(), failed_event()
    assert check_subject(arrived, arrived.subject()).kind == "tile_arrived"
    assert check_subject(failed, failed.subject()).stage == "convert"
    # a redo_/hold_ subject carries an input of its stage: any kind, the same coordinates
    assert check_subject(arrived, "tp.redo_convert.A1.3.m1-r2-c4").target == "convert"
    assert check_subject(failed, "tp.hold_stitch.A1.3.m1-r2-c4").target == "stitch"
    for event, text, why in [
        (arrived, "tp.tile_processed.A1.3.m1-r2-c4", "type"),
        (arrived, "tp.stage_failed.A1.3.m1-r2-c4.convert", "type"),
        (arrived, "tp.tile_arrived.victim.3.m1-r2-c4", "acq"),
        (arrived, "tp.tile_arrived.A1.4.m1-r2-c4", "slice"),
        (arrived, "tp.tile_arrived.A1.3.m0-r2-c4", "tile"),
        (arrived, "tp.redo_convert.victim.3.m1-r2-c4", "acq"),
        (failed, "tp.stage_failed.A1.3.m1-r2-c4.process", "stage"),  # another stage's name
        (arrived, "tp.tile_arrived.A1.3.m1-r2-c4.x", "not an event subject"),
    ]:
        with pytest.raises(SubjectMismatch, match=why):
            check_subject(event, text)
        with pytest.raises(InvalidEvent) as err:
            decode_event(event.to_json(), subject=text)
        assert err.value.reason == "subject_mismatch", text
    assert decode_event(failed.to_json(), subject=failed.subject()) == failed


@pytest.mark.unit
def test_acquisition_filters_select_what_they_say_and_refuse_wildcard_ids():
    from messages.subjects import acq_filter, filter_matches, subject

    tile = subject("tile_processed", "a1", "3", "m0-r1-c2")
    failed = subject("stage_failed", "a1", "3", "m0-r1-c2", stage="stitch")
    other = subject("tile_processed", "a2", "3", "m0-r1-c2")
    assert acq_filter("a1") == "tp.*.a1.>"
    assert acq_filter("a1", "tile_processed") == "tp.tile_processed.a1.>"
    assert acq_filter("a1", "*", 3, "m0-r1-c2") == "tp.*.a1.3.m0-r1-c2"
    assert acq_filter("a1", "*", 3, "m0-r1-c2", "*") == "tp.*.a1.3.m0-r1-c2.*"
    cases = {
        acq_filter("a1"): (tile, failed),
        acq_filter("a1", "tile_processed", 3): (tile,),
        acq_filter("a1", "*", 3, "m0-r1-c2"): (tile,),
        acq_filter("a1", "*", 3, "m0-r1-c2", "stitch"): (failed,),
    }
    for wanted, selected in cases.items():
        for text in (tile, failed, other):
            assert filter_matches(wanted, text) == (text in selected), (wanted, text)
    for bad in ("a.b", ">", "a*", "", "a b"):
        with pytest.raises(ValueError):
            acq_filter(bad)
    with pytest.raises(ValueError, match="give the tile"):
        acq_filter("a1", "stage_failed", 3, stage="stitch")
    with pytest.raises(ValueError):
        acq_filter("a1", "*", 3, "m0-r1-c2", "a.b")
