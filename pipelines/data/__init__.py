"""Pure data code (no Ray): image decoding checks and source listings."""
