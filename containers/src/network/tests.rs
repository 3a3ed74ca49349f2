use super::*;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

#[test]
fn subnet_parse_and_derived_addresses() {
    let s: Ipv4Subnet = "10.87.0.0/24".parse().unwrap();
    assert_eq!(s.to_string(), "10.87.0.0/24");
    assert_eq!(s.prefix(), 24);
    assert_eq!(s.netmask(), ip("255.255.255.0"));
    assert_eq!(s.gateway(), ip("10.87.0.1"));
    assert_eq!(s.broadcast(), ip("10.87.0.255"));
    assert!(s.contains(ip("10.87.0.77")));
    assert!(!s.contains(ip("10.87.1.1")));
    let s: Ipv4Subnet = " 172.20.16.0/20 ".parse().unwrap();
    assert_eq!(s.broadcast(), ip("172.20.31.255"));
    assert!("10.0.0.0/8".parse::<Ipv4Subnet>().is_ok());
    assert!("10.0.0.0/30".parse::<Ipv4Subnet>().is_ok());
}

#[test]
fn subnet_rejects_bad_input() {
    for bad in [
        "",
        "10.87.0.0",
        "10.87.0.0/",
        "10.87.0/24",
        "10.87.0.0/x",
        "10.87.0.0/7",
        "10.87.0.0/31",
        "10.87.0.0/32",
        "10.87.0.0/300",
        "10.87.0.1/24",
        "::1/64",
    ] {
        let err = bad.parse::<Ipv4Subnet>().unwrap_err();
        assert!(matches!(err, Error::InvalidSubnet { .. }), "{bad}: {err}");
    }
    let msg = "10.87.0.5/24"
        .parse::<Ipv4Subnet>()
        .unwrap_err()
        .to_string();
    assert!(msg.contains("10.87.0.0"), "{msg}");
}

#[test]
fn bridge_config_defaults_and_validation() {
    let c = BridgeConfig::default();
    assert_eq!(c.name, "ltvbr0");
    assert_eq!(c.subnet.to_string(), "10.87.0.0/24");
    assert_eq!(c.gateway(), ip("10.87.0.1"));
    let a = c.attachment("web", ip("10.87.0.2"));
    assert_eq!(a.host_ifname, host_ifname("web"));
    assert_eq!((a.prefix, a.gateway), (24, ip("10.87.0.1")));
    assert!(BridgeConfig::new("br-test", "192.168.50.0/24").is_ok());
    assert!(BridgeConfig::new("a-name-that-is-too-long", "10.0.0.0/24").is_err());
    assert!(BridgeConfig::new("bad/name", "10.0.0.0/24").is_err());
    assert!(BridgeConfig::new("br0", "10.0.0.3/24").is_err());
}

#[test]
fn allocate_skips_reserved_and_used() {
    let s: Ipv4Subnet = "10.87.0.0/24".parse().unwrap();
    assert_eq!(allocate(&s, &[]), Some(ip("10.87.0.2")));
    assert_eq!(
        allocate(&s, &[ip("10.87.0.2"), ip("10.87.0.3"), ip("10.87.0.5")]),
        Some(ip("10.87.0.4"))
    );
    // /30: network .0, gateway .1, one host .2, broadcast .3.
    let s: Ipv4Subnet = "10.1.2.0/30".parse().unwrap();
    assert_eq!(allocate(&s, &[]), Some(ip("10.1.2.2")));
    assert_eq!(allocate(&s, &[ip("10.1.2.2")]), None);
    // /29: hosts .2 to .6; full once they are used.
    let s: Ipv4Subnet = "10.1.2.8/29".parse().unwrap();
    let used: Vec<_> = (10..=14).map(|i| Ipv4Addr::new(10, 1, 2, i)).collect();
    assert_eq!(allocate(&s, &used[..4]), Some(ip("10.1.2.14")));
    assert_eq!(allocate(&s, &used), None);
}

#[test]
fn host_ifname_is_short_stable_and_distinct() {
    let names: HashSet<String> = (0..2000).map(|i| host_ifname(&format!("c{i}"))).collect();
    assert_eq!(names.len(), 2000);
    for n in &names {
        assert_eq!(n.len(), MAX_IFNAME_LEN);
        assert!(n.starts_with("veth"));
        validate_ifname(n).unwrap();
    }
    assert_eq!(host_ifname("web"), host_ifname("web"));
    assert_eq!(host_ifname(&"x".repeat(500)).len(), MAX_IFNAME_LEN);
}

#[test]
fn tap_ifname_never_clashes_with_a_veth() {
    let taps: HashSet<String> = (0..2000).map(|i| tap_ifname(&format!("c{i}"))).collect();
    assert_eq!(taps.len(), 2000);
    for n in &taps {
        assert_eq!(n.len(), MAX_IFNAME_LEN);
        assert!(n.starts_with("ltvtap"));
        validate_ifname(n).unwrap();
    }
    assert_eq!(tap_ifname("vm"), tap_ifname("vm"));
    assert_ne!(tap_ifname("vm"), host_ifname("vm"));
    assert!(!host_ifname("vm").starts_with("ltvtap"));
}

#[test]
fn ifname_validation() {
    for ok in ["eth0", "ltvbr0", "veth0123456789a"] {
        validate_ifname(ok).unwrap();
    }
    for bad in ["", ".", "..", "a b", "a/b", "a:b", "veth0123456789ab"] {
        assert!(validate_ifname(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn hosts_file_content() {
    let h = hosts_file("web", Some(ip("10.87.0.2")));
    assert!(h.starts_with("127.0.0.1\tlocalhost\n"));
    assert!(h.contains("::1\tlocalhost"));
    assert!(h.ends_with("10.87.0.2\tweb\n"));
    let h = hosts_file("solo", None);
    assert!(h.ends_with("127.0.1.1\tsolo\n"));
}

#[test]
fn nft_script_names_table_chain_and_subnet() {
    let c = BridgeConfig::new("br-x.1", "10.9.0.0/16").unwrap();
    let s = nat::nft_setup_script(&c);
    assert!(s.contains("add table ip ltv\n"));
    assert!(s.contains("chain ip ltv nat_br_x_1 { type nat hook postrouting"));
    assert!(s.contains("ip saddr 10.9.0.0/16 oifname != \"br-x.1\" masquerade"));
}

#[test]
fn bridge_mac_is_fixed_unicast_and_locally_administered() {
    let mac = bridge_mac("ltvbr0");
    assert_eq!(mac[0] & 3, 2, "{mac:02x?}");
    assert_eq!(mac, bridge_mac("ltvbr0"), "the same on every call");
    assert_ne!(mac, bridge_mac("ltvbr1"), "each bridge its own");
}
