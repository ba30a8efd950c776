"""Reading and writing data on disk and in object storage: raw instrument tiles (`rawio`), the
work/output tree layout (`layout`), the one atomic writer (`atomic`), OME-Zarr stores
(`omezarr`, `volume`, `mosaic_volume`), NIfTI copies and previews (`nifti`,
`nifti_products`, `previews`, `preview_index`, `exports`), the focus plane file
(`focus_plane`), raw archives (`raw_archive`), S3 storage (`storage`) and webhook posts
(`webhook`). Builds on `core`.
"""
