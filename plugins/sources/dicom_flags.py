"""The command-line flags of the ``dicom`` source: three of :class:`DicomOptions`' fields.

Read by sslkit through the ``sslkit.source_flags`` entry point without importing the
source (no pydicom, no torch), so ``sslkit pretrain --help`` stays fast; the values reach
the source exactly as ``--data-opt window=...`` would.
"""

FLAGS = {
    "window": "Intensity window: auto, minmax, W,L, a CT preset (lung, mediastinum, bone, brain, abdomen, liver, "
              "subdural, stroke) or three stacked as channels (lung,mediastinum,bone) (default: auto).",
    "modality": "Keep only these modalities, e.g. CT,MR.",
    "series_description": "Keep only series whose description matches this glob.",
    "sample": "slice (one 2D image per slice, default), slab:K (K adjacent slices of a series as channels) "
              "or volume (each series as one 3D volume).",
    "spacing": "--sample volume: resample to X[,Y,Z] mm (default: the series' own spacing).",
    "volume_size": "--sample volume: crop / zero pad to D,H,W voxels, e.g. 64,64,64.",
}
