"""Data: sources (`sources`), the manifest and splits (`manifest`), image decoding (`images`),
the preprocessing cache (`cache`), and versioning with DVC and git (`versioning`)."""
