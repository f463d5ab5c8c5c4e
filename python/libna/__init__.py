"""libna: neighborhood attention for every DLPack framework."""
