"""Data views: the two MoPro views and the eval view, on the CPU (per sample) and batched on a device."""
