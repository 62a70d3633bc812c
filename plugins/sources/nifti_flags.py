"""The command-line flags of the ``nifti`` source (read without importing it: no nibabel, no torch)."""

FLAGS = {
    "window": "Intensity window: minmax (over the volume, the nifti default) or W,L in the file's units.",
    "sample": "slice (one 2D image per axial slice, default), slab:K (K adjacent slices as channels) "
              "or volume (each image as one 3D volume).",
    "spacing": "--sample volume: resample to X[,Y,Z] mm (default: the file's own voxel size).",
    "volume_size": "--sample volume: crop / zero pad to D,H,W voxels, e.g. 64,64,64.",
}
