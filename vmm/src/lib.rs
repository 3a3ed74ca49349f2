//! The Lightervisor microVM monitor: one process per microVM (built in the microVM issues).
