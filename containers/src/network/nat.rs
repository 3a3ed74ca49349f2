//! NAT masquerade for a bridge's subnet: nftables (own `ip ltv` table), iptables as fallback.

use std::io::Write;
use std::process::{Command, Stdio};

use super::{BridgeConfig, Error};

/// Our nftables table; one chain per bridge so several bridges can coexist.
const TABLE: &str = "ltv";

enum Tool {
    Nft,
    Iptables,
}

fn runs(cmd: &str, args: &[&str]) -> bool {
    if crate::which(cmd).is_none() {
        return false;
    }
    Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn pick_tool() -> Result<Tool, Error> {
    // The daemon installs nothing itself (it may run inside a user's container or a
    // netns without a route): `./dev` installs nftables on the host.
    if runs("nft", &["--version"]) {
        return Ok(Tool::Nft);
    }
    if runs("iptables", &["--version"]) {
        return Ok(Tool::Iptables);
    }
    Err(Error::Nat(
        "neither nft nor iptables is installed (Debian: apt-get install nftables)".into(),
    ))
}

fn chain_name(bridge: &str) -> String {
    let safe: String = bridge
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("nat_{safe}")
}

/// The nft script that (re)creates the bridge's masquerade chain atomically.
pub(crate) fn nft_setup_script(cfg: &BridgeConfig) -> String {
    let chain = chain_name(&cfg.name);
    let net = cfg.subnet;
    format!(
        "add table ip {TABLE}\n\
         add chain ip {TABLE} {chain} {{ type nat hook postrouting priority 100; policy accept; }}\n\
         flush chain ip {TABLE} {chain}\n\
         add rule ip {TABLE} {chain} ip saddr {net} oifname != \"{br}\" masquerade\n",
        br = cfg.name
    )
}

fn nft(script: &str) -> Result<(), Error> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Nat(format!("running nft: {e}")))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(script.as_bytes())
        .map_err(|e| Error::Nat(format!("writing to nft: {e}")))?;
    let out = child
        .wait_with_output()
        .map_err(|e| Error::Nat(format!("waiting for nft: {e}")))?;
    if !out.status.success() {
        return Err(Error::Nat(format!(
            "nft failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn iptables_rule(cfg: &BridgeConfig) -> Vec<String> {
    [
        "-t",
        "nat",
        "POSTROUTING",
        "-s",
        &cfg.subnet.to_string(),
        "!",
        "-o",
        &cfg.name,
        "-m",
        "comment",
        "--comment",
        &format!("ltv:{}", cfg.name),
        "-j",
        "MASQUERADE",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn iptables(op: &str, cfg: &BridgeConfig) -> bool {
    let mut args = iptables_rule(cfg);
    // The chain name follows the table; insert the operation before it.
    args.insert(2, op.to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    runs("iptables", &args)
}

pub(crate) fn setup(cfg: &BridgeConfig) -> Result<(), Error> {
    match pick_tool()? {
        Tool::Nft => nft(&nft_setup_script(cfg)),
        Tool::Iptables => {
            if !iptables("-C", cfg) && !iptables("-A", cfg) {
                return Err(Error::Nat(format!(
                    "iptables could not add the masquerade rule for {} ({})",
                    cfg.subnet, cfg.name
                )));
            }
            Ok(())
        }
    }
}

pub(crate) fn remove(cfg: &BridgeConfig) -> Result<(), Error> {
    match pick_tool()? {
        Tool::Nft => {
            if !runs("nft", &["list", "table", "ip", TABLE]) {
                return Ok(());
            }
            let chain = chain_name(&cfg.name);
            // "add" first so that deleting a chain that is already gone is not an error.
            nft(&format!(
                "add chain ip {TABLE} {chain}\nflush chain ip {TABLE} {chain}\ndelete chain ip {TABLE} {chain}\n"
            ))?;
            // Drop the table once its last chain is gone.
            let listing = Command::new("nft")
                .args(["list", "table", "ip", TABLE])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            if !listing.contains("chain ") {
                nft(&format!("delete table ip {TABLE}\n"))?;
            }
            Ok(())
        }
        Tool::Iptables => {
            // Remove every copy (bounded, in case the rule was added more than once).
            for _ in 0..16 {
                if !iptables("-D", cfg) {
                    break;
                }
            }
            Ok(())
        }
    }
}
