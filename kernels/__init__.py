"""Numerical core of tilepipe: PS-OCT spectra -> complex -> PS products -> en-face.

Every kernel runs on NumPy or CuPy from the same code (``xp`` array-module dispatch).
"""

from .backend import array_module, device_name, get_xp, gpu_available, to_host
from .calibration import SpectrometerCalibration
from .enface import (
    EnfaceImages,
    detect_surface,
    enface_products,
    gradient_surface_candidates,
    median_filter_2d,
    retardance_slope,
    slope_to_delta_n,
    surface_candidates,
)
from .forward import (
    SourceSpectrum,
    dc_background,
    depth_bin_of,
    depth_um_of,
    ps_amplitudes,
    simulate_spectra,
)
from .optic_axis import (
    ApparentMap,
    OpticAxisFit,
    axis_rgb,
    axis_weight,
    inplane_rgb,
    project,
    solve_optic_axis,
    through_plane_rgb,
)
from .pipeline import ProcessingParams, TileProducts, process_tile
from .psoct import PSVolumes, orientation_deg, ps_products, reflectivity_db, retardance_deg
from .resampling import ResamplingTable, resampling_table
from .spectral import (
    bscans_to_complex,
    estimate_background,
    jones_depth,
    jones_to_output_depth,
    spectra_to_complex,
    validate_input,
    validate_raw,
)

__all__ = [
    "ApparentMap",
    "EnfaceImages",
    "OpticAxisFit",
    "PSVolumes",
    "ProcessingParams",
    "ResamplingTable",
    "SourceSpectrum",
    "SpectrometerCalibration",
    "TileProducts",
    "array_module",
    "axis_rgb",
    "axis_weight",
    "bscans_to_complex",
    "dc_background",
    "depth_bin_of",
    "depth_um_of",
    "detect_surface",
    "device_name",
    "enface_products",
    "estimate_background",
    "get_xp",
    "gpu_available",
    "gradient_surface_candidates",
    "inplane_rgb",
    "jones_depth",
    "jones_to_output_depth",
    "median_filter_2d",
    "orientation_deg",
    "process_tile",
    "project",
    "ps_amplitudes",
    "ps_products",
    "reflectivity_db",
    "resampling_table",
    "retardance_deg",
    "retardance_slope",
    "simulate_spectra",
    "slope_to_delta_n",
    "solve_optic_axis",
    "spectra_to_complex",
    "surface_candidates",
    "through_plane_rgb",
    "to_host",
    "validate_input",
    "validate_raw",
]
