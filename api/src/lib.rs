//! Lightervisor's daemon, REST API, backends and CLI.
//!
//! A request reads top-down: [`cli`] → [`client`] → [`types`] → [`daemon::handlers`] →
//! [`daemon::instances`] → [`backend::Backend`] → the runtime crates.

pub mod backend;
pub mod cli;
pub mod client;
pub mod daemon;
pub mod db;
pub mod demo;
pub mod stream;
pub mod types;
