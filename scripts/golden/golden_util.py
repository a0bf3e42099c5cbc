"""What the golden scripts share: how a model file's identity is recorded beside its golden."""
import hashlib


def sha256_file(path):
    """sha256 of the file at `path`, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
