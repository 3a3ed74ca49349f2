use super::*;
use sha2::{Digest as _, Sha256};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Builds layer tars entry by entry (raw names, so tests can forge hostile ones).
struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    fn new() -> Self {
        Layer(tar::Builder::new(Vec::new()))
    }
    fn header(kind: tar::EntryType, path: &str, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        h
    }
    fn file(mut self, path: &str, data: &[u8], mode: u32) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, path, mode, data.len() as u64);
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }
    fn dir(mut self, path: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, path, 0o755, 0);
        h.set_cksum();
        self.0.append(&h, &[][..]).unwrap();
        self
    }
    fn link(mut self, kind: tar::EntryType, path: &str, target: &str) -> Self {
        let mut h = Self::header(kind, path, 0o777, 0);
        h.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
        h.set_cksum();
        self.0.append(&h, &[][..]).unwrap();
        self
    }
    fn chardev(mut self, path: &str, major: u32, minor: u32) -> Self {
        let mut h = Self::header(tar::EntryType::Char, path, 0o666, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        h.set_cksum();
        self.0.append(&h, &[][..]).unwrap();
        self
    }
    fn done(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

fn base_layers() -> Vec<(Vec<u8>, bool)> {
    let l1 = Layer::new()
        .dir("etc/")
        .dir("bin/")
        .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", 0o644)
        .file("etc/remove-me", b"x", 0o644)
        .file("bin/tool", b"v1", 0o755)
        .link(tar::EntryType::Symlink, "bin/link", "tool")
        .link(tar::EntryType::Link, "bin/hard", "bin/tool")
        .dir("opq/")
        .file("opq/a", b"a", 0o644)
        .dir("opq/sub/")
        .file("opq/sub/b", b"b", 0o644)
        .file("suid", b"s", 0o4755)
        .chardev("dev/null", 1, 3)
        .done();
    let l2 = Layer::new()
        .file("etc/.wh.remove-me", b"", 0o644)
        .dir("opq/")
        .file("opq/new", b"new", 0o644)
        .file("opq/.wh..wh..opq", b"", 0o644)
        .file("etc/added", b"added", 0o600)
        .done();
    let l3 = Layer::new()
        .file("bin/tool", b"v2", 0o755)
        .dir("sbin/")
        .file("sbin/init", b"#!/bin/sh\n", 0o755)
        .done();
    // The middle layer is gzip'd; the others stay plain tars.
    vec![(l1, false), (l2, true), (l3, false)]
}

fn config_json(diff_ids: &[String]) -> Vec<u8> {
    let ids: Vec<String> = diff_ids.iter().map(|d| format!("sha256:{d}")).collect();
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ["/bin/tool"],
            "Cmd": ["--help"],
            "Env": ["PATH=/bin", "A=b"],
            "WorkingDir": "/opq",
            "User": "1000:1000"
        },
        "rootfs": {"type": "layers", "diff_ids": ids}
    }))
    .unwrap()
}

/// Writes an OCI layout into `dir`; returns the config digest.
fn write_oci(dir: &Path, layers: &[(Vec<u8>, bool)]) -> String {
    let blobs: Vec<(Vec<u8>, String, bool)> = layers
        .iter()
        .map(|(raw, gz)| (if *gz { gzip(raw) } else { raw.clone() }, sha(raw), *gz))
        .collect();
    write_oci_blobs(dir, &blobs)
}

/// Same from ready-made (blob, diff_id, gzip'd) triples, so tests can corrupt blobs.
fn write_oci_blobs(dir: &Path, layers: &[(Vec<u8>, String, bool)]) -> String {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| {
        let h = sha(data);
        std::fs::write(blobs.join(&h), data).unwrap();
        h
    };
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (blob, diff_id, gz) in layers {
        diff_ids.push(diff_id.clone());
        let mt = if *gz {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        } else {
            "application/vnd.oci.image.layer.v1.tar"
        };
        descs.push(serde_json::json!({"mediaType": mt, "digest": format!("sha256:{}", put(blob)), "size": blob.len()}));
    }
    let config = config_json(&diff_ids);
    let config_digest = put(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{config_digest}"), "size": config.len()},
        "layers": descs
    }))
    .unwrap();
    let mdig = put(&manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{mdig}"), "size": manifest.len(),
             "annotations": {"org.opencontainers.image.ref.name": "test:1"}}
        ]
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    config_digest
}

fn tar_dir(dir: &Path, out: &Path) {
    let mut b = tar::Builder::new(std::fs::File::create(out).unwrap());
    b.append_dir_all(".", dir).unwrap();
    b.finish().unwrap();
}

/// Writes a legacy `docker save` archive; returns the config digest.
fn write_docker(out: &Path, layers: &[(Vec<u8>, bool)]) -> String {
    let mut b = tar::Builder::new(std::fs::File::create(out).unwrap());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_path(name).unwrap();
        h.set_cksum();
        b.append(&h, data).unwrap();
    };
    let diff_ids: Vec<String> = layers.iter().map(|(raw, _)| sha(raw)).collect();
    let config = config_json(&diff_ids);
    let cdig = sha(&config);
    let mut names = Vec::new();
    for (i, (raw, gz)) in layers.iter().enumerate() {
        let name = format!("{i:064x}/layer.tar");
        add(&name, &if *gz { gzip(raw) } else { raw.clone() });
        names.push(name);
    }
    add(&format!("{cdig}.json"), &config);
    let manifest = serde_json::json!([{"Config": format!("{cdig}.json"), "RepoTags": ["test:1"], "Layers": names}]);
    add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    b.into_inner().unwrap().flush().unwrap();
    cdig
}

fn check_tree(info: &ImageInfo) {
    let r = &info.rootfs;
    assert_eq!(
        std::fs::read(r.join("etc/passwd")).unwrap(),
        b"root:x:0:0::/root:/bin/sh\n"
    );
    assert!(!r.join("etc/remove-me").exists(), "whiteout");
    assert!(
        !r.join("opq/a").exists() && !r.join("opq/sub").exists(),
        "opaque dir cleared"
    );
    assert_eq!(std::fs::read(r.join("opq/new")).unwrap(), b"new");
    assert_eq!(std::fs::read(r.join("etc/added")).unwrap(), b"added");
    assert_eq!(
        std::fs::metadata(r.join("etc/added")).unwrap().mode() & 0o7777,
        0o600
    );
    assert_eq!(std::fs::read(r.join("bin/tool")).unwrap(), b"v2");
    assert_eq!(
        std::fs::read_link(r.join("bin/link")).unwrap(),
        Path::new("tool")
    );
    // The hardlink kept the first layer's inode, as overlayfs would show it.
    assert_eq!(std::fs::read(r.join("bin/hard")).unwrap(), b"v1");
    assert_eq!(
        std::fs::metadata(r.join("suid")).unwrap().mode() & 0o7777,
        0o4755
    );
    if unsafe { libc::geteuid() } == 0 {
        let md = std::fs::symlink_metadata(r.join("dev/null")).unwrap();
        assert!(md.file_type().is_char_device());
        assert_eq!(md.rdev(), libc::makedev(1, 3));
    }
    let c = &info.config;
    assert_eq!(c.entrypoint, vec!["/bin/tool"]);
    assert_eq!(c.cmd, vec!["--help"]);
    assert_eq!(c.env, vec!["PATH=/bin", "A=b"]);
    assert_eq!(c.working_dir, "/opq");
    assert_eq!(c.user, "1000:1000");
    assert_eq!(c.init.as_deref(), Some("/sbin/init"));
    assert!(info.size_bytes > 0);
}

fn store_entries(store: &ImageStore) -> Vec<String> {
    std::fs::read_dir(store.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn image_import_oci_dir() {
    let t = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    assert_eq!(
        std::fs::metadata(store.root()).unwrap().mode() & 0o777,
        0o700
    );
    let layout = t.path().join("layout");
    let digest = write_oci(&layout, &base_layers());
    let info = store.import(&layout, &NoProgress).unwrap();
    assert_eq!(info.fingerprint, digest);
    assert_eq!(info.rootfs, store.root().join(&digest).join("rootfs"));
    assert!(info.source.contains("test:1"));
    check_tree(&info);
    assert_eq!(store.get(&digest).unwrap(), info);
    assert_eq!(store.list().unwrap(), vec![info.clone()]);
    // Importing again returns the stored image.
    assert_eq!(store.import(&layout, &NoProgress).unwrap(), info);
    assert_eq!(store_entries(&store), vec![digest.clone()]);
    store.delete(&digest).unwrap();
    assert!(matches!(store.get(&digest), Err(Error::NotFound(_))));
    assert!(matches!(store.delete(&digest), Err(Error::NotFound(_))));
    assert!(matches!(store.get("../etc"), Err(Error::NotFound(_))));
    assert!(store_entries(&store).is_empty());
}

#[test]
fn image_import_oci_tar_and_docker_archive() {
    let t = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    let layout = t.path().join("layout");
    let digest = write_oci(&layout, &base_layers());
    let oci_tar = t.path().join("oci.tar");
    tar_dir(&layout, &oci_tar);
    let info = store.import(&oci_tar, &NoProgress).unwrap();
    assert_eq!(info.fingerprint, digest);
    check_tree(&info);
    store.delete(&digest).unwrap();

    // Also gzip'd as a whole.
    let gz = t.path().join("oci.tar.gz");
    std::fs::write(&gz, gzip(&std::fs::read(&oci_tar).unwrap())).unwrap();
    check_tree(&store.import(&gz, &NoProgress).unwrap());
    store.delete(&digest).unwrap();

    let docker = t.path().join("docker.tar");
    let ddigest = write_docker(&docker, &base_layers());
    let info = store.import(&docker, &NoProgress).unwrap();
    assert_eq!(info.fingerprint, ddigest);
    assert!(info.source.starts_with("docker-archive:"));
    check_tree(&info);
    assert_eq!(store_entries(&store), vec![ddigest]);
}

fn assert_invalid(store: &ImageStore, path: &Path, what: &str) {
    match store.import(path, &NoProgress) {
        Err(Error::Invalid(msg)) => eprintln!("INVALID {what}: {msg}"),
        other => panic!("{what}: expected Invalid, got {other:?}"),
    }
    assert!(
        store_entries(store).is_empty(),
        "{what}: store not empty: {:?}",
        store_entries(store)
    );
}

#[test]
fn image_import_truncated_and_corrupt() {
    let t = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    let docker = t.path().join("docker.tar");
    write_docker(&docker, &base_layers());
    let full = std::fs::read(&docker).unwrap();
    // Cut in the middle of the layers, and right before the end.
    for cut in [full.len() / 3, full.len() / 2, full.len() - 1536] {
        let p = t.path().join(format!("cut-{cut}.tar"));
        std::fs::write(&p, &full[..cut]).unwrap();
        assert_invalid(&store, &p, &format!("docker archive cut at {cut}"));
    }

    let layout = t.path().join("layout");
    write_oci(&layout, &base_layers());
    let oci_tar = t.path().join("oci.tar");
    tar_dir(&layout, &oci_tar);
    let full = std::fs::read(&oci_tar).unwrap();
    let p = t.path().join("oci-cut.tar");
    std::fs::write(&p, &full[..full.len() * 2 / 3]).unwrap();
    assert_invalid(&store, &p, "truncated OCI tar");
    let gz = t.path().join("oci-cut.tar.gz");
    let z = gzip(&full);
    std::fs::write(&gz, &z[..z.len() - 100]).unwrap();
    assert_invalid(&store, &gz, "truncated gzip");

    // A layer blob with a flipped byte no longer matches its digest.
    let layers = base_layers();
    let blob = layout.join("blobs/sha256").join(sha(&layers[0].0));
    let mut data = std::fs::read(&blob).unwrap();
    let at = data.windows(6).position(|w| w == b"root:x").unwrap();
    data[at] ^= 1;
    std::fs::write(&blob, &data).unwrap();
    assert_invalid(&store, &layout, "bad layer digest");

    // A truncated gzip layer (digest and size fixed up so only the stream is bad).
    let layout2 = t.path().join("layout2");
    let raw = layers[0].0.clone();
    let z = gzip(&raw);
    write_oci_blobs(&layout2, &[(z[..z.len() / 2].to_vec(), sha(&raw), true)]);
    assert_invalid(&store, &layout2, "truncated gzip layer");
    // A plain layer cut short, likewise.
    let layout2b = t.path().join("layout2b");
    write_oci_blobs(
        &layout2b,
        &[(raw[..raw.len() - 1024].to_vec(), sha(&raw), false)],
    );
    assert_invalid(&store, &layout2b, "truncated tar layer");
    // Right blob, wrong diff_id.
    let layout2c = t.path().join("layout2c");
    write_oci_blobs(&layout2c, &[(raw.clone(), sha(b"other"), false)]);
    assert_invalid(&store, &layout2c, "bad diff_id");

    // Missing blob and garbage metadata.
    let layout3 = t.path().join("layout3");
    let cdig = write_oci(&layout3, &base_layers());
    std::fs::remove_file(layout3.join("blobs/sha256").join(&cdig)).unwrap();
    assert_invalid(&store, &layout3, "missing config blob");
    std::fs::write(layout3.join("index.json"), b"{not json").unwrap();
    assert_invalid(&store, &layout3, "bad index.json");
    let junk = t.path().join("junk.tar");
    std::fs::write(&junk, vec![7u8; 3000]).unwrap();
    assert_invalid(&store, &junk, "not an archive");
}

#[test]
fn image_import_refuses_escapes() {
    let t = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    let outside = t.path().join("outside");
    std::fs::create_dir(&outside).unwrap();

    let l = Layer::new().file("../escape", b"x", 0o644).done();
    let layout = t.path().join("l1");
    write_oci(&layout, &[(l, false)]);
    assert_invalid(&store, &layout, "dot-dot path");

    let l = Layer::new()
        .file("etc/x", b"x", 0o644)
        .link(tar::EntryType::Link, "h", "../../etc/shadow")
        .done();
    let layout = t.path().join("l2");
    write_oci(&layout, &[(l, false)]);
    assert_invalid(&store, &layout, "hardlink out");

    // A symlink to the host followed by writes through it: they must land in the rootfs.
    let target = outside.to_str().unwrap();
    let l1 = Layer::new()
        .link(tar::EntryType::Symlink, "evil", target)
        .done();
    let l2 = Layer::new().file("evil/pwned", b"x", 0o644).done();
    let l3 = Layer::new()
        .link(tar::EntryType::Symlink, "evil2", target)
        .file("evil2/pwned", b"x", 0o644)
        .done();
    let layout = t.path().join("l3");
    write_oci(&layout, &[(l1, false), (l2, false), (l3, true)]);
    let info = store.import(&layout, &NoProgress).unwrap();
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "wrote through a symlink"
    );
    assert!(std::fs::symlink_metadata(info.rootfs.join("evil"))
        .unwrap()
        .is_dir());
    assert!(info.rootfs.join("evil2/pwned").is_file());
    assert_eq!(info.config.init, None);

    // A whiteout reached through a symlink must not delete host files.
    std::fs::write(outside.join("keep"), b"k").unwrap();
    let l1 = Layer::new()
        .link(tar::EntryType::Symlink, "s", target)
        .done();
    let l2 = Layer::new()
        .file("s/.wh.keep", b"", 0o644)
        .file("s/.wh..wh..opq", b"", 0o644)
        .done();
    let layout = t.path().join("l4");
    write_oci(&layout, &[(l1, false), (l2, false)]);
    store.import(&layout, &NoProgress).unwrap();
    assert!(outside.join("keep").exists());
}

#[test]
fn image_apt_sources_parser() {
    let deb822 = "\
# comment
Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm

Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Enabled: no

Types: deb deb-src
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";
    assert_eq!(
        parse_apt_sources(deb822, true).as_deref(),
        Some("http://mirror.example/debian")
    );
    let only_updates = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm-updates\n";
    assert_eq!(parse_apt_sources(only_updates, true), None);

    let list = "\
# deb http://old.example/debian bookworm main
deb http://mirror.example/debian-security bookworm-security main
deb-src http://mirror.example/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] http://mirror.example/debian bookworm main contrib
deb http://other.example/debian bookworm main
";
    assert_eq!(
        parse_apt_sources(list, false).as_deref(),
        Some("http://mirror.example/debian")
    );
    assert_eq!(
        parse_apt_sources(
            "deb http://mirror.example/debian bookworm-updates main\n",
            false
        ),
        None
    );
    assert_eq!(parse_apt_sources("", false), None);
}

#[test]
fn image_debootstrap_progress_lines() {
    struct Rec(std::sync::Mutex<Vec<String>>);
    impl Progress for Rec {
        fn stage(&self, m: &str) {
            self.0.lock().unwrap().push(format!("stage {m}"));
        }
        fn advance(&self, d: u64, t: Option<u64>) {
            self.0.lock().unwrap().push(format!("{d}/{t:?}"));
        }
    }
    let rec = Rec(Default::default());
    let mut tr = super::debian::Tracker::default();
    for l in [
        "I: Retrieving InRelease",
        "I: Retrieving Packages",
        "I: Retrieving libc6 2.36-9",
        "I: Retrieving zlib1g 1:1.2.13",
        "I: Validating libc6 2.36-9",
        "I: Retrieving zlib1g 1:1.2.13",
        "I: Validating zlib1g 1:1.2.13",
        "I: Extracting libc6...",
        "I: Unpacking required packages...",
        "I: Unpacking libc6...",
        "W: something",
    ] {
        tr.line(l, &rec);
    }
    let got = rec.0.into_inner().unwrap();
    assert_eq!(
        got,
        vec![
            "stage Retrieving InRelease",
            "stage Retrieving Packages",
            "stage Retrieving packages",
            "1/None",
            "2/None",
            "3/None",
            "stage Extracting packages",
            "1/Some(3)",
            "stage Unpacking required packages...",
            "stage Unpacking packages",
            "1/Some(3)",
        ]
    );
}

#[test]
fn image_build_busybox() {
    let installed = std::process::Command::new("dpkg-query")
        .args(["-W", "busybox-static"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !installed || unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: needs root and busybox-static");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    let start = std::time::Instant::now();
    let info = store.build_busybox(&NoProgress).unwrap();
    eprintln!("busybox image built in {:?}: {info:?}", start.elapsed());
    let r = &info.rootfs;
    assert!(r.join("bin/busybox").is_file());
    assert!(std::fs::read_link(r.join("bin/sh"))
        .unwrap()
        .ends_with("busybox"));
    assert!(std::fs::symlink_metadata(r.join("sbin/init")).is_ok());
    assert_eq!(
        std::fs::metadata(r.join("tmp")).unwrap().mode() & 0o7777,
        0o1777
    );
    assert!(std::fs::read_to_string(r.join("etc/passwd"))
        .unwrap()
        .starts_with("root:x:0:0:"));
    assert!(r.join("etc/init.d/rcS").is_file());
    assert_eq!(info.config.cmd, vec!["/bin/sh"]);
    assert_eq!(info.config.init.as_deref(), Some("/sbin/init"));
    assert_eq!(info.config.working_dir, "/");
    assert!(info.source.starts_with("busybox-static "));
    // The applets run in the rootfs.
    let out = std::process::Command::new(r.join("bin/busybox"))
        .args(["echo", "hi"])
        .output()
        .unwrap();
    assert_eq!(out.stdout, b"hi\n");
    // Idempotent: same fingerprint, nothing new in the store.
    let again = store.build_busybox(&NoProgress).unwrap();
    assert_eq!(again.fingerprint, info.fingerprint);
    assert_eq!(store_entries(&store), vec![info.fingerprint.clone()]);
}

/// Slow (a real debootstrap from the host's mirror): `cargo test image_build_debian -- --ignored`.
#[test]
#[ignore]
fn image_build_debian() {
    struct Print;
    impl Progress for Print {
        fn stage(&self, m: &str) {
            eprintln!("stage: {m}");
        }
        fn advance(&self, d: u64, t: Option<u64>) {
            if d.is_multiple_of(20) {
                eprintln!("  {d}/{t:?}");
            }
        }
    }
    let t = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    let start = std::time::Instant::now();
    // e.g. LTV_DEBIAN_INCLUDE=sysvinit-core to get an init.
    let include: Vec<String> = std::env::var("LTV_DEBIAN_INCLUDE")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    let with_init = include
        .iter()
        .any(|p| p == "sysvinit-core" || p == "systemd-sysv");
    let opts = DebianOptions {
        suite: String::new(),
        include,
        mirror: None,
    };
    let info = store.build_debian(&opts, &Print).unwrap();
    eprintln!("debian image built in {:?}: {info:?}", start.elapsed());
    assert!(info.rootfs.join("usr/bin/apt-get").exists());
    assert!(info.rootfs.join("var/lib/dpkg/status").exists());
    assert_eq!(
        info.config.init.is_some(),
        with_init,
        "init only if asked for"
    );
    assert_eq!(
        std::fs::read_to_string(info.rootfs.join("etc/hostname")).unwrap(),
        "localhost\n"
    );
    assert_eq!(
        std::fs::read(info.rootfs.join("etc/resolv.conf")).unwrap(),
        b""
    );
    store.delete(&info.fingerprint).unwrap();
    assert!(store_entries(&store).is_empty());
}

/// Slow: kills debootstrap while it runs in the chroot; nothing may remain.
#[test]
#[ignore]
fn image_build_debian_killed() {
    struct Killer;
    impl Progress for Killer {
        fn stage(&self, m: &str) {
            eprintln!("stage: {m}");
            if m == "Unpacking packages" {
                // Our child debootstrap leads its own process group.
                for ent in std::fs::read_dir("/proc").unwrap().flatten() {
                    let Ok(stat) = std::fs::read_to_string(ent.path().join("stat")) else {
                        continue;
                    };
                    let fields: Vec<&str> = stat
                        .rsplit_once(')')
                        .unwrap()
                        .1
                        .split_whitespace()
                        .collect();
                    let ppid: u32 = fields[1].parse().unwrap();
                    if ppid == std::process::id() && stat.contains("(debootstrap)") {
                        let pid: i32 = ent.file_name().to_str().unwrap().parse().unwrap();
                        eprintln!("killing debootstrap {pid}");
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
        }
        fn advance(&self, _: u64, _: Option<u64>) {}
    }
    let t = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    let opts = DebianOptions {
        suite: String::new(),
        include: vec![],
        mirror: None,
    };
    let err = store.build_debian(&opts, &Killer).unwrap_err();
    eprintln!("error: {err}");
    assert!(matches!(err, Error::Tool(_)));
    assert!(
        store_entries(&store).is_empty(),
        "left {:?}",
        store_entries(&store)
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(store.root().to_str().unwrap()),
        "mounts left under the store"
    );
}

#[test]
fn image_import_nested_index_picks_host_platform() {
    let t = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    let layout = t.path().join("layout");
    let digest = write_oci(&layout, &base_layers());
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let mut real = index["manifests"][0].clone();
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    };
    real["platform"] = serde_json::json!({"os": "linux", "architecture": arch});
    // Picking any other entry fails: their blobs do not exist.
    let other = serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": format!("sha256:{}", sha(b"nope")), "size": 4,
        "platform": {"os": "linux", "architecture": "s390x"}});
    let attest = serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": format!("sha256:{}", sha(b"att")), "size": 3,
        "annotations": {"vnd.docker.reference.type": "attestation-manifest"}});
    let inner = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [other, attest, real]
    }))
    .unwrap();
    let idig = sha(&inner);
    std::fs::write(layout.join("blobs/sha256").join(&idig), &inner).unwrap();
    let outer = serde_json::json!({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": format!("sha256:{idig}"), "size": inner.len()}
    ]});
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&outer).unwrap(),
    )
    .unwrap();
    let info = store.import(&layout, &NoProgress).unwrap();
    assert_eq!(info.fingerprint, digest);
    check_tree(&info);
}

#[test]
fn image_import_docker_save_with_oci_layout() {
    // Newer `docker save`: an OCI layout plus a manifest.json pointing into blobs/.
    let t = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    let layout = t.path().join("layout");
    let digest = write_oci(&layout, &base_layers());
    let layers: Vec<String> = base_layers()
        .iter()
        .map(|(raw, gz)| {
            format!(
                "blobs/sha256/{}",
                sha(&if *gz { gzip(raw) } else { raw.clone() })
            )
        })
        .collect();
    let manifest = serde_json::json!([{"Config": format!("blobs/sha256/{digest}"), "RepoTags": null, "Layers": layers}]);
    std::fs::write(
        layout.join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    let archive = t.path().join("save.tar");
    tar_dir(&layout, &archive);
    let info = store.import(&archive, &NoProgress).unwrap();
    assert_eq!(info.fingerprint, digest);
    assert!(info.source.starts_with("oci:"));
    check_tree(&info);
    // The same content as a plain docker-archive (OCI bits removed) gives the same image.
    std::fs::remove_file(layout.join("index.json")).unwrap();
    std::fs::remove_file(layout.join("oci-layout")).unwrap();
    assert_eq!(
        store.import(&layout, &NoProgress).unwrap().fingerprint,
        digest
    );
}

#[test]
fn image_store_open_removes_stale_builds() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("store");
    std::fs::create_dir_all(root.join(".tmp-999999999-0-0/rootfs/etc")).unwrap();
    std::fs::write(root.join(".tmp-999999999-0-0/rootfs/etc/x"), b"x").unwrap();
    let live = root.join(format!(".tmp-{}-0-0", std::process::id()));
    std::fs::create_dir_all(&live).unwrap();
    let store = ImageStore::open(&root).unwrap();
    assert_eq!(
        store_entries(&store),
        vec![live.file_name().unwrap().to_string_lossy().into_owned()]
    );
    assert!(store.list().unwrap().is_empty());
}

/// Needs the apt mirror: the busybox-static package fetched with `apt-get download`.
#[test]
#[ignore]
fn image_build_busybox_downloaded() {
    let t = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&t.path().join("store")).unwrap();
    let info = super::busybox::build_with(&store, &NoProgress, false).unwrap();
    assert!(std::fs::read_link(info.rootfs.join("bin/sh"))
        .unwrap()
        .ends_with("busybox"));
    assert_eq!(store_entries(&store), vec![info.fingerprint.clone()]);
    // Same package version as the installed one gives the same image.
    assert_eq!(
        store.build_busybox(&NoProgress).unwrap().fingerprint,
        info.fingerprint
    );
}

/// Manual check: `LTV_IMPORT=path|busybox LTV_STORE=dir cargo test image_import_from_env -- --ignored`
/// imports a real image (or builds busybox) into a store that is kept for inspection.
#[test]
#[ignore]
fn image_import_from_env() {
    let path = std::env::var("LTV_IMPORT").expect("LTV_IMPORT");
    let store =
        ImageStore::open(Path::new(&std::env::var("LTV_STORE").expect("LTV_STORE"))).unwrap();
    let start = std::time::Instant::now();
    let info = if path == "busybox" {
        store.build_busybox(&NoProgress).unwrap()
    } else {
        store.import(Path::new(&path), &NoProgress).unwrap()
    };
    eprintln!("done in {:?}: {info:?}", start.elapsed());
}
