//! Helpers for the end-to-end tests: find and drive the real `ltv` binary.
