"""Readers and writers of adapter and checkpoint layouts (installed as ``adaptkit.formats``)."""
