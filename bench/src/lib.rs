//! Density and overhead harness (`ltv bench`); grows with each backend.
