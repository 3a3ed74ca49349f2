//! Images end to end: busybox build, OCI layout and docker-archive imports with
//! whiteouts and config, corrupt archives, deletes.

use ltv_e2e::{require_root, stderr, stdout, TestDaemon};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// A layer tar: (path, content or symlink target, is_symlink).
fn layer(entries: &[(&str, &[u8], bool)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data, symlink) in entries {
        let mut h = tar::Header::new_gnu();
        if *symlink {
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            h.set_mode(0o777);
            b.append_link(&mut h, path, std::str::from_utf8(data).unwrap())
                .unwrap();
        } else if path.ends_with('/') {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
            h.set_mode(0o755);
            b.append_data(&mut h, path, &[][..]).unwrap();
        } else {
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            b.append_data(&mut h, path, *data).unwrap();
        }
    }
    b.into_inner().unwrap()
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Two layers: a busybox base with /data/{a,b,sub/c}, then a layer that deletes
/// /data/a (whiteout) and replaces /data/sub (opaque dir) with just d.
fn layers() -> (Vec<u8>, Vec<u8>) {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static is installed by ./dev");
    let mut base: Vec<(&str, &[u8], bool)> =
        vec![("bin/", b"", false), ("bin/busybox", &busybox, false)];
    for applet in ["sh", "ls", "echo", "cat", "pwd", "id"] {
        base.push((
            Box::leak(format!("bin/{applet}").into_boxed_str()),
            b"busybox",
            true,
        ));
    }
    base.extend([
        ("data/", &b""[..], false),
        ("data/a", b"a", false),
        ("data/b", b"b", false),
        ("data/sub/", b"", false),
        ("data/sub/c", b"c", false),
    ]);
    let top = layer(&[
        ("data/.wh.a", b"", false),
        ("data/sub/", b"", false),
        ("data/sub/.wh..wh..opq", b"", false),
        ("data/sub/d", b"d", false),
    ]);
    (layer(&base), top)
}

fn config(diff_ids: &[String]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo $FOO; pwd; ls /data; ls /data/sub"],
            "Env": ["PATH=/bin", "FOO=from-image"],
            "WorkingDir": "/data"
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids.iter().map(|d| format!("sha256:{d}")).collect::<Vec<_>>()}
    }))
    .unwrap()
}

fn docker_archive(dir: &Path) -> PathBuf {
    let (l1, l2) = layers();
    let cfg = config(&[sha(&l1), sha(&l2)]);
    let cfg_name = format!("{}.json", sha(&cfg));
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": cfg_name, "RepoTags": ["test:latest"], "Layers": ["l1/layer.tar", "l2/layer.tar"]
    }]))
    .unwrap();
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("manifest.json", &manifest),
        (cfg_name.as_str(), &cfg),
        ("l1/layer.tar", &l1),
        ("l2/layer.tar", &l2),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    let path = dir.join("docker-archive.tar");
    std::fs::write(&path, b.into_inner().unwrap()).unwrap();
    path
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// An OCI image layout directory with gzip'd layers; `corrupt` breaks one blob's digest.
fn oci_layout(dir: &Path, corrupt: bool) -> PathBuf {
    let root = dir.join(if corrupt { "oci-bad" } else { "oci" });
    let blobs = root.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let (l1, l2) = layers();
    let cfg = config(&[sha(&l1), sha(&l2)]);
    let (g1, g2) = (gzip(&l1), gzip(&l2));
    let put = |data: &[u8]| -> String {
        let d = sha(data);
        std::fs::write(blobs.join(&d), data).unwrap();
        d
    };
    let (dc, d1, d2) = (put(&cfg), put(&g1), put(&g2));
    if corrupt {
        // Another gzip mtime: the same layer to gzip, but only the digest can tell.
        let mut broken = g2.clone();
        broken[4] ^= 0xff;
        std::fs::write(blobs.join(&d2), broken).unwrap();
    }
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{dc}"), "size": cfg.len()},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": format!("sha256:{d1}"), "size": g1.len()},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": format!("sha256:{d2}"), "size": g2.len()}
        ]
    }))
    .unwrap();
    let dm = put(&manifest);
    std::fs::write(
        root.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{dm}"), "size": manifest.len()}]
    });
    std::fs::write(root.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    root
}

fn store_entries(d: &TestDaemon) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d.state_dir.join("images"))
        .map(|r| {
            r.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

const EXPECTED: &str = "from-image\n/data\nb\nsub\nd\n";

#[test]
fn busybox_build_list_and_delete() {
    require_root!();
    let d = TestDaemon::start();
    d.build_busybox();
    let list = d.ok(&["image", "list"]);
    assert!(
        list.contains("busybox") && list.contains("busybox-static"),
        "{list}"
    );
    let (_, images) = d.api_json("GET", "/1.0/images", None);
    let fp = images[0]["fingerprint"].as_str().unwrap().to_string();
    assert!(d
        .state_dir
        .join("images")
        .join(&fp)
        .join("rootfs/bin/busybox")
        .exists());
    // Building again is idempotent.
    d.build_busybox();
    assert_eq!(
        store_entries(&d)
            .iter()
            .filter(|e| !e.starts_with('.'))
            .count(),
        1
    );

    d.ok(&[
        "launch", "busybox", "user", "--kind", "app", "--", "sleep", "600",
    ]);
    let (s, e) = d.api_json("DELETE", "/1.0/images/busybox", None);
    assert_eq!(s, 409, "an image in use is kept: {e}");
    d.ok(&["delete", "--force", "user"]);
    d.ok(&["image", "delete", "busybox"]);
    assert!(
        !d.state_dir.join("images").join(&fp).exists(),
        "unpacked image removed"
    );
    assert_eq!(d.api("DELETE", "/1.0/images/busybox", None).0, 404);
}

#[test]
fn import_docker_archive_applies_whiteouts_and_config() {
    require_root!();
    let d = TestDaemon::start();
    let work = tempfile::tempdir().unwrap();
    let archive = docker_archive(work.path());
    d.ok(&[
        "image",
        "import",
        archive.to_str().unwrap(),
        "--alias",
        "fromdocker",
    ]);
    let out = d.ltv(&["run", "--rm", "fromdocker"]);
    assert_eq!(stdout(&out), EXPECTED, "{}", stderr(&out));
    // -- CMD replaces Cmd but keeps the Entrypoint, as Docker does.
    let out = d.ltv(&["run", "--rm", "fromdocker", "--", "echo override"]);
    assert_eq!(stdout(&out), "override\n", "{}", stderr(&out));
}

#[test]
fn import_oci_layout_dir_and_tar() {
    require_root!();
    let d = TestDaemon::start();
    let work = tempfile::tempdir().unwrap();
    let layout = oci_layout(work.path(), false);
    d.ok(&[
        "image",
        "import",
        layout.to_str().unwrap(),
        "--alias",
        "ocidir",
    ]);
    assert_eq!(stdout(&d.ltv(&["run", "--rm", "ocidir"])), EXPECTED);

    let tar_path = work.path().join("oci.tar");
    let status = std::process::Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&tar_path)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    d.ok(&[
        "image",
        "import",
        tar_path.to_str().unwrap(),
        "--alias",
        "ocitar",
    ]);
    let (_, img) = d.api_json("GET", "/1.0/images", None);
    let fps: Vec<&str> = img
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["fingerprint"].as_str().unwrap())
        .collect();
    assert_eq!(fps[0], fps[1], "the same image by content: {img}");
}

#[test]
fn corrupt_archives_are_400_and_leave_nothing() {
    require_root!();
    let d = TestDaemon::start();
    let work = tempfile::tempdir().unwrap();
    let before = store_entries(&d);

    let archive = docker_archive(work.path());
    let bytes = std::fs::read(&archive).unwrap();
    let truncated = work.path().join("truncated.tar");
    std::fs::write(&truncated, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let body = format!(
        r#"{{"alias":"broken","source":{{"type":"import","path":"{}"}}}}"#,
        truncated.display()
    );
    let (s, e) = d.api_json("POST", "/1.0/images", Some(&body));
    assert_eq!((s, e["code"].as_u64()), (400, Some(400)), "truncated: {e}");

    let bad = oci_layout(work.path(), true);
    let out = d.ltv(&[
        "image",
        "import",
        bad.to_str().unwrap(),
        "--alias",
        "baddigest",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).to_lowercase().contains("digest"),
        "{}",
        stderr(&out)
    );

    let garbage = work.path().join("garbage.tar");
    std::fs::write(&garbage, b"this is not a tar archive at all").unwrap();
    let body = format!(
        r#"{{"alias":"garbage","source":{{"type":"import","path":"{}"}}}}"#,
        garbage.display()
    );
    assert_eq!(d.api_json("POST", "/1.0/images", Some(&body)).0, 400);

    let body = r#"{"alias":"missing","source":{"type":"import","path":"/no/such/file.tar"}}"#;
    assert_eq!(d.api_json("POST", "/1.0/images", Some(body)).0, 400);
    let body = r#"{"source":{"type":"build","builder":"windows"}}"#;
    assert_eq!(d.api_json("POST", "/1.0/images", Some(body)).0, 400);

    assert_eq!(store_entries(&d), before, "nothing left in the image store");
    let (_, images) = d.api_json("GET", "/1.0/images", None);
    assert_eq!(images.as_array().map(|a| a.len()), Some(0), "{images}");
}
