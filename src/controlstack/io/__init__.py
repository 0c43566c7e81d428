"""Reading and writing what users hand us: images, checkpoints, PNG metadata."""
