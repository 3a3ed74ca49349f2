//! (owner: runtime helper)
