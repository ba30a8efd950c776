"""stitch: align neighbouring tiles as soon as both are processed; fuse the mosaic when the
slice's mosaic is complete (or declared finished with tiles missing).

Pairwise phase correlation runs on an en-face product (AIP by default) while the slice is
still being acquired; the global solve (weighted least squares anchored to the stage model),
the feathered fusion of every en-face product and the multiscale OME-Zarr write happen once,
when the last tile (or the last pair, or the declaration of missing tiles) completes the
mosaic. A failed or missing tile leaves a hole marked in the metadata.

Every mosaic also gets a ``mask`` channel, the lab's tissue mask: its fused AIP smoothed by a
Gaussian of sigma 5 px (NaN-aware) above the mosaic's ``mask_threshold_db`` (manifest
``[[mosaic]]``; 60 dB normal, 55 dB tilted by default): 1 tissue, 0 not, NaN where no tile
covers. The en-face channels themselves are kept unmasked; the mask is applied where the lab
applies it, in the register stage's thru-plane step (:mod:`kernels.thruplane`).
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, ClassVar, Literal

import numpy as np
import zarr
from pydantic import Field

from kernels.stitch import (
    PairAlignment,
    PairMeasurement,
    align_pair,
    fuse_products,
    solve_positions,
)
from kernels.thruplane import tissue_mask
from messages.events import (
    AcquisitionFinished,
    Event,
    PairRejection,
    SliceStitched,
    StageFailed,
    TileCoord,
    TilePairAligned,
    TilePosition,
    TileProcessed,
)
from messages.subjects import PIPELINE_ORDER
from services.core.errors import PermanentError
from services.core.manifest import Manifest, MosaicGeometry
from services.io.atomic import basis_digest, is_complete
from services.io.exports import export_mosaic
from services.io.focus_plane import fit_from_tiles, plane_of
from services.io.focus_plane import load as load_focus
from services.io.focus_plane import store as store_focus
from services.io.layout import VOLUME_PRODUCTS, focus_plane_path, mosaic_path, volume_product_of
from services.io.mosaic_volume import BLOCK_YX, DepthCrop, MosaicMask, fuse_volume
from services.io.omezarr import write_omezarr
from services.runtime.options import StageOptions
from services.runtime.stage import Context, Result, Stage
from services.state.acquisitions import ACQ_BUCKET, manifest_at
from services.state.lattice import LATTICE_BUCKET, TERMINAL, MosaicBook, MosaicState

# fused products: name in the mosaic -> array in a tile's products group
PRODUCTS = {
    "aip": "aip",
    "mip": "mip",
    "retardance": "retardance_enface",
    "orientation": "orientation_enface",
    "birefringence": "birefringence",
}
UNITS = {  # of the fused channels (docs/conventions.md)
    "aip": "dB",
    "mip": "dB",
    "retardance": "degrees",
    "orientation": "degrees (optic axis, blended on doubled angles)",
    "birefringence": "delta-n (dimensionless)",
    "mask": "1 tissue (AIP smoothed by a Gaussian of mask_sigma_px above mask_threshold_db), "
    "0 not, NaN without data",
}
MASK_SIGMA_PX = 5.0  # the lab's imgaussfilt(mask, 5) before thresholding
UPSTREAM = PIPELINE_ORDER[1 : PIPELINE_ORDER.index("stitch")]  # the stages before stitch


class StitchOptions(StageOptions):
    """`[stages.stitch] options`."""

    align_product: Literal[tuple(PRODUCTS)] = Field(  # type: ignore[valid-type]
        default="aip", description="en-face product the pairs are aligned on"
    )
    min_confidence: float = Field(
        default=0.2, description="pairs aligned with a lower confidence are rejected"
    )
    fuse_volume: bool = Field(
        default=False,
        description="also fuse the 3-D volume mosaics (before `slice_stitched`, which lists "
        "them in `volumes`: see docs/performance.md)",
    )
    volume_products: tuple[Literal[VOLUME_PRODUCTS], ...] = Field(  # type: ignore[valid-type]
        default=VOLUME_PRODUCTS, description="volume mosaics fused"
    )
    volume_crop: bool = Field(
        default=True, description="keep `volume_depth` samples from the focus plane"
    )
    volume_depth: int = Field(default=DepthCrop.depth, description="depth samples kept")
    volume_offset: int = Field(
        default=DepthCrop.offset, description="first sample kept below the focus plane"
    )
    volume_mask: bool = Field(default=True, description="apply the mosaic's tissue mask")
    volume_block: tuple[int, int] = Field(
        default=BLOCK_YX, description="y, x pixels fused at a time (sets the memory)"
    )


class Stitch(Stage):
    """Neighbour-triggered pairwise alignment and per-mosaic fusion."""

    name = "stitch"
    consumes = (TileProcessed, StageFailed, AcquisitionFinished)
    produces = (TilePairAligned, SliceStitched)
    buckets = (LATTICE_BUCKET, ACQ_BUCKET)
    defaults: ClassVar[dict[str, Any]] = {"concurrency": 2, "ack_wait_s": 120}

    options_model = StitchOptions
    options: StitchOptions

    async def handle(self, event: Event, ctx: Context) -> Result:
        if isinstance(event, StageFailed):
            return await self._on_failure(event, ctx)
        manifest = await self._manifest(ctx, event.acq)
        if isinstance(event, TileProcessed):
            outside = manifest.outside(event.tile)
            if outside is not None:  # no mosaic holds it: never into the books
                raise PermanentError(outside)
            return await self._on_tile(event, manifest, ctx)
        assert isinstance(event, AcquisitionFinished)
        books: dict[tuple[int, int], MosaicBook] = {}
        for tile in event.missing:
            if not manifest.contains(tile):
                continue
            key = (tile.slice, tile.mosaic)
            if key not in books:
                books[key] = await MosaicBook.open(ctx, event.acq, *key)
            await books[key].mark_missing(tile.row, tile.col)  # never over a late tile
        result = Result()
        for (s, m), book in sorted(books.items()):
            done = await self._maybe_stitch(book, event.acq, s, m, manifest, ctx)
            result.events.extend(done.events)
        return result

    async def _on_failure(self, event: StageFailed, ctx: Context) -> Result:
        """An upstream stage gave up on a tile: the tile is terminal (a hole in the mosaic).

        A failure this stage cannot act on is ignored, never failed in turn (failures never
        trigger failures): not a tile, not a stage it waits for (never its own failures), an
        acquisition it does not know, a tile outside its lattice."""
        tile = event.tile
        if tile is None or event.stage not in UPSTREAM:
            return Result()
        record = await ctx.acquisition(event.acq)
        manifest = manifest_at(self.config.roots.raw, record["manifest"]) if record else None
        if manifest is None or not manifest.contains(tile):
            why = "unknown acquisition" if manifest is None else "tile outside the lattice"
            ctx.log.warning("failure_ignored", failed_stage=event.stage, reason=why)
            return Result(detail=f"ignored: {why}")
        book = await MosaicBook.open(ctx, event.acq, tile.slice, tile.mosaic)
        await book.mark_tile(
            tile.row, tile.col, "failed", stage=event.stage, error=event.error[:500]
        )
        return await self._maybe_stitch(book, event.acq, tile.slice, tile.mosaic, manifest, ctx)

    async def _manifest(self, ctx: Context, acq: str) -> Manifest:
        record = await ctx.acquisition(acq)
        if record is None:
            raise RuntimeError(f"acquisition {acq} is not registered yet")
        return manifest_at(self.config.roots.raw, record["manifest"])

    async def _on_tile(self, event: TileProcessed, manifest: Manifest, ctx: Context) -> Result:
        tile = event.tile
        group = event.products[PRODUCTS[self.options.align_product]].rsplit("/", 1)[0]
        book = await MosaicBook.open(ctx, event.acq, tile.slice, tile.mosaic)
        # the tile's basis is part of the mosaic's digest: a tile recomputed from other
        # inputs (a calibration fix) re-aligns its pairs and re-fuses its mosaic
        await book.mark_tile(tile.row, tile.col, "processed", products=group, basis=event.basis)
        state = await book.state()
        events: list[Event] = []
        done = state.processed()
        geometry = manifest.geometry(tile.mosaic)
        for nb in geometry.neighbours(tile.row, tile.col):
            if nb not in done:
                continue
            a, b = sorted([(tile.row, tile.col), nb])  # fixed = upper / left tile
            bases = [state.tiles[a].get("basis", ""), state.tiles[b].get("basis", "")]
            known = state.pairs.get((a, b))
            if known is not None and known.get("bases", ["", ""]) == bases and not ctx.force:
                continue
            record = await asyncio.to_thread(
                self._align, geometry, state.tiles[a]["products"], state.tiles[b]["products"], a, b
            )
            record["bases"] = bases
            await book.record_pair(a, b, record)
            events.append(
                TilePairAligned(
                    acq=event.acq,
                    slice=tile.slice,
                    mosaic=tile.mosaic,
                    a=TileCoord(slice=tile.slice, mosaic=tile.mosaic, row=a[0], col=a[1]),
                    b=TileCoord(slice=tile.slice, mosaic=tile.mosaic, row=b[0], col=b[1]),
                    shift_px=tuple(record["shift_yx"]),
                    confidence=record["confidence"],
                    accepted=record["accepted"],
                    reason=record["reason"],
                    basis=basis_digest(bases) if any(bases) else "",
                    producer=self.name,
                )
            )
        stitched = await self._maybe_stitch(book, event.acq, tile.slice, tile.mosaic, manifest, ctx)
        return Result(events=events + stitched.events, unchanged=stitched.unchanged and not events)

    def _image(self, group: str, product: str) -> np.ndarray:
        store = self.config.roots.resolve("work", group)
        return np.asarray(zarr.open_group(str(store), mode="r")[product][:], dtype=np.float32)

    def _align(
        self,
        geometry: MosaicGeometry,
        group_a: str,
        group_b: str,
        a: tuple[int, int],
        b: tuple[int, int],
    ) -> dict:
        """Phase correlation of the overlap; the record stored in KV and sent in the event."""
        ya, xa = geometry.nominal_position_px(*a)
        yb, xb = geometry.nominal_position_px(*b)
        tol = geometry.position_tolerance_px
        result = align_pair(
            self._image(group_a, PRODUCTS[self.options.align_product]),
            self._image(group_b, PRODUCTS[self.options.align_product]),
            nominal_shift_yx=(yb - ya, xb - xa),
            max_shift_px=tol,
        )
        record = {k: v for k, v in dataclasses.asdict(result).items() if k != "candidates"}
        record["shift_yx"] = [float(v) for v in result.shift_yx]
        record["nominal_yx"] = [float(v) for v in result.nominal_yx]
        deviation = float(np.hypot(*result.correction_yx))
        reasons = []
        if result.status != "ok":
            reasons.append(result.status)
        if result.confidence < self.options.min_confidence:
            reasons.append(f"low confidence {result.confidence:.2f}")
        if deviation > tol:
            reasons.append(f"shift {deviation:.1f} px from the stage model (tolerance {tol})")
        record["accepted"] = not reasons
        record["reason"] = "; ".join(reasons)
        record["peak_ratio"] = float(min(record["peak_ratio"], 1e9))
        return record

    async def _maybe_stitch(
        self,
        book: MosaicBook,
        acq: str,
        slice_index: int,
        mosaic: int,
        manifest: Manifest,
        ctx: Context,
    ) -> Result:
        """Fuse the mosaic if every tile is terminal and every processed pair is aligned."""
        state = await book.state()
        geometry = manifest.geometry(mosaic)
        coords = [(r, c) for r in range(geometry.rows) for c in range(geometry.cols)]
        if any(state.tiles.get(rc, {}).get("state") not in TERMINAL for rc in coords):
            return Result()
        done = state.processed() & set(coords)  # a stray key outside the grid is ignored
        for rc in done:
            for nb in geometry.neighbours(*rc):
                if nb in done and tuple(sorted([rc, nb])) not in state.pairs:
                    return Result()  # a neighbour's alignment is still running
        if not done:
            raise PermanentError(f"slice {slice_index} mosaic {mosaic} has no processed tile")
        digest = state.digest()
        rel = mosaic_path(acq, slice_index, mosaic)
        write = (
            digest != state.stitched_digest
            or ctx.force
            or not self.config.roots.resolve("output", rel).exists()
        )
        (
            positions,
            residual,
            missing,
            rejected,
            stage_placed,
            volumes,
            exports,
        ) = await asyncio.to_thread(
            self._fuse, manifest, state, rel, acq, slice_index, mosaic, write, ctx.log
        )
        await book.mark_stitched(digest)
        ctx.log.info(
            "mosaic_stitched",
            slice=slice_index,
            mosaic=mosaic,
            tiles=len(done),
            missing=len(missing),
            residual_rms_px=round(residual, 3),
            pairs_rejected=len(rejected),
            stage_placed=[f"r{r}-c{c}" for r, c in stage_placed],
            rejections=[f"r{p.a[0]}-c{p.a[1]}/r{p.b[0]}-c{p.b[1]}: {p.reason}" for p in rejected][
                :20
            ],
        )
        event = SliceStitched(
            acq=acq,
            slice=slice_index,
            mosaic=mosaic,
            path=rel,
            positions=positions,
            residual_rms_px=residual,
            missing=missing,
            inputs=digest,
            rejected=rejected,
            stage_placed=stage_placed,
            volumes=volumes,
            exports=exports,
            producer=self.name,
        )
        return Result(events=[event], unchanged=not write)

    def _fuse(
        self,
        manifest: Manifest,
        state: MosaicState,
        rel: str,
        acq: str,
        slice_index: int,
        mosaic: int,
        write: bool,
        log: Any,
    ):
        geometry = manifest.geometry(mosaic)
        rows, cols = geometry.rows, geometry.cols
        n = rows * cols
        index = {(r, c): r * cols + c for r in range(rows) for c in range(cols)}
        nominal = np.array([geometry.nominal_position_px(r, c) for r, c in index], float)
        done = state.processed() & set(index)
        present = np.array([rc in done for rc in index])
        pairs, kept = [], []
        for (a, b), rec in state.pairs.items():
            if a not in index or b not in index:
                continue
            fields = {f.name for f in dataclasses.fields(PairAlignment)}
            values = {k: v for k, v in rec.items() if k in fields}
            values["shift_yx"] = tuple(values["shift_yx"])
            values["nominal_yx"] = tuple(values["nominal_yx"])
            values["window_yx"] = tuple(values.get("window_yx", (0, 0)))
            alignment = PairAlignment(**values) if rec.get("accepted") else None
            pairs.append(PairMeasurement(index[a], index[b], alignment))
            kept.append((a, b, rec))
        layout = solve_positions(
            nominal,
            pairs,
            present=present,
            min_confidence=self.options.min_confidence,
            stage_tol_px=geometry.position_tolerance_px,
        )
        residuals = layout.residuals_yx[layout.accepted] if len(pairs) else np.zeros((0, 2))
        rms = float(np.sqrt(np.mean(np.sum(residuals**2, axis=1)))) if len(residuals) else 0.0
        positions = [
            TilePosition(
                row=r, col=c, y=float(layout.positions_yx[i, 0]), x=float(layout.positions_yx[i, 1])
            )
            for (r, c), i in index.items()
            if present[i]
        ]
        missing = [
            TileCoord(slice=slice_index, mosaic=mosaic, row=r, col=c)
            for (r, c), i in index.items()
            if not present[i]
        ]
        rejected = [  # the aligner's reason, else the solve's (e.g. a residual outlier)
            PairRejection(
                a=a, b=b, reason=(rec.get("reason") or layout.reasons[k] or "rejected")[:200]
            )
            for k, (a, b, rec) in enumerate(kept)
            if not layout.accepted[k] and present[index[a]] and present[index[b]]
        ]
        stage_placed = [rc for rc, i in index.items() if layout.stage_only[i]]
        volumes: dict[str, str] = {}
        if write:
            tiles = {name: [None] * n for name in PRODUCTS}
            for rc in done:
                group = state.tiles[rc]["products"]
                for name, product in PRODUCTS.items():
                    tiles[name][index[rc]] = self._image(group, product)
            mosaics = fuse_products(tiles, layout.positions_yx, angle_products=("orientation",))
            first = next(iter(mosaics.values()))
            px = geometry.pixel_size_um
            images = {name: m.image for name, m in mosaics.items()}
            threshold = geometry.mask_threshold_db
            images["mask"] = tissue_mask(images["aip"], threshold, MASK_SIGMA_PX)
            conventions = manifest.conventions()
            write_omezarr(
                self.config.roots.resolve("output", rel),
                images,
                pixel_size_um=(px, px),
                origin_um=(first.origin_yx[0] * px, first.origin_yx[1] * px),
                attributes={
                    "acq": acq,
                    "slice": slice_index,
                    "mosaic": mosaic,
                    "illumination": geometry.illumination,
                    "units": UNITS,
                    "tilt_deg": geometry.tilt_deg,
                    "mask": {"of": "aip", "threshold_db": threshold, "sigma_px": MASK_SIGMA_PX},
                    "orientation_convention": {
                        "preset": manifest.processing.preset,
                        "orientation_offset_deg": conventions["orientation_offset_deg"],
                        "orientation_sign": conventions["orientation_sign"],
                    },
                    "positions_yx_px": {
                        f"r{r}-c{c}": [p.y, p.x]
                        for p, (r, c) in zip(
                            positions, [(p.row, p.col) for p in positions], strict=True
                        )
                    },
                    "missing_tiles": [f"r{t.row}-c{t.col}" for t in missing],
                    "residual_rms_px": rms,
                    "pairs_rejected": int(len(pairs) - int(np.sum(layout.accepted))),
                },
            )
            if self.options.fuse_volume:
                volumes = self._fuse_volume(
                    manifest, state, layout.positions_yx, index, rel, acq, slice_index, mosaic, log
                )
        elif self.options.fuse_volume:  # already fused: announce what is there
            for product in self.options.volume_products:
                out = volume_product_of(rel, product)
                if is_complete(self.config.roots.resolve("output", out)):
                    volumes[product] = out
        exports = export_mosaic(  # NIfTI and previews beside the store (services/io/exports.py)
            self.config.roots.output,
            rel,
            slice_index,
            mosaic,
            manifest.lattice.slice_thickness_um,
            force=write,
        )
        return positions, rms, missing, rejected, stage_placed, volumes, exports

    def _fuse_volume(
        self,
        manifest: Manifest,
        state: MosaicState,
        positions_yx: np.ndarray,
        index: dict,
        rel: str,
        acq: str,
        slice_index: int,
        mosaic: int,
        log: Any,
    ) -> dict[str, str]:
        """The mosaic's 3-D volumes (dBI, R3D, O3D) fused out of core beside the en-face
        mosaic: cropped below the illumination's focus plane (found on its first fused
        slice, then reused), masked with the mosaic's mask. Returns product -> path."""
        roots = self.config.roots
        geometry = manifest.geometry(mosaic)
        tiles = [
            (roots.resolve("work", state.tiles[rc]["products"]), tuple(positions_yx[index[rc]]))
            for rc in sorted(state.processed() & set(index))
        ]
        crop, focus = None, None
        if self.options.volume_crop:
            try:
                focus = self._focus_plane(acq, geometry, tiles, slice_index, mosaic)
                plane = plane_of(focus, tuple(focus["tile_shape"]))
            except ValueError as exc:  # e.g. no tissue in any overlap: crop flat, store none
                log.warning("focus_plane_not_found", slice=slice_index, reason=str(exc))
                focus, plane = {"found_on": None, "error": str(exc)[:300]}, None
            crop = DepthCrop(self.options.volume_offset, self.options.volume_depth, plane)
        mosaic_store = roots.resolve("output", rel)
        mask = MosaicMask(mosaic_store) if self.options.volume_mask else None
        conventions = manifest.conventions()
        written = {}
        for product in self.options.volume_products:
            out = volume_product_of(rel, product)
            fuse_volume(
                tiles,
                roots.resolve("output", out),
                pixel_um=geometry.pixel_size_um,
                axial_um=manifest.lattice.axial_pixel_um,
                product=product,
                crop=crop,
                mask=mask,
                block_yx=self.options.volume_block,
                attributes={
                    "acq": acq,
                    "slice": slice_index,
                    "mosaic": mosaic,
                    "illumination": geometry.illumination,
                    "mosaic_path": rel,
                    "focus_plane": None
                    if focus is None
                    else {
                        "path": focus_plane_path(acq, geometry.illumination),
                        "found_on": focus["found_on"],
                        **({"error": focus["error"]} if "error" in focus else {}),
                    },
                    "orientation_convention": {
                        "preset": manifest.processing.preset,
                        "orientation_offset_deg": conventions["orientation_offset_deg"],
                        "orientation_sign": conventions["orientation_sign"],
                    },
                },
            )
            written[product] = out
        return written

    def _focus_plane(
        self, acq: str, geometry: MosaicGeometry, tiles: list, slice_index: int, mosaic: int
    ) -> dict:
        """The illumination's stored focus plane, found from this mosaic if there is none."""
        path = self.config.roots.resolve("output", focus_plane_path(acq, geometry.illumination))
        record = load_focus(path)
        if record is None:
            found = fit_from_tiles(tiles, geometry.mask_threshold_db)
            found["found_on"] = {"slice": slice_index, "mosaic": mosaic}
            found["illumination"] = geometry.illumination
            record, _ = store_focus(path, found)
        return record
